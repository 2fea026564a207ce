"""llamita: run, chat with, fine-tune and serve Llama 2 models in plain PyTorch."""

from llamita.chat import encode_chat
from llamita.config import Config
from llamita.errors import LlamitaError
from llamita.formats import load_model, save_model
from llamita.llm import LLM
from llamita.model import Llama
from llamita.sampling import SamplingParams
from llamita.tokenizer import load_tokenizer
from llamita.train import finetune

__all__ = ["Config", "LLM", "Llama", "LlamitaError", "SamplingParams", "encode_chat", "finetune", "load_model",
           "load_tokenizer", "save_model"]
__version__ = "0.1.0"
