"""llamita: run, chat with, fine-tune and serve Llama 2 models in plain PyTorch."""

from llamita.config import Config
from llamita.errors import LlamitaError
from llamita.formats import load_model, save_model
from llamita.model import Llama

__all__ = ["Config", "Llama", "LlamitaError", "load_model", "save_model"]
__version__ = "0.1.0"
