"""The CUDA path, against transformers and against the CPU path (marker ``cuda``: skipped without a GPU,
run on a lent one by ``scripts/gpu_check.py``, whose dry run tests/test_gpu_check.py keeps working).

Tolerances: float32 on CUDA is compared with float32 on the CPU exactly where the output is discrete
(greedy tokens, served text) and within 1e-4 where it is a number (a first training loss, summation
order being all that differs); bfloat16 and float16 logits must be as close to the float32 logits
as transformers' own in that dtype: within twice its largest error, plus 0.1% of the logits' range.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import llamita
from helpers import FAST, random_tokens, running_server, tiny_base, write_data
from llamita.config import Config
from llamita.model import Llama

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = "repite la palabra gato"
GREEDY = dict(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny HF Llama (with a tokenizer) wide enough for tinygemm's int4 tiles."""
    return tiny_base(tmp_path_factory.mktemp("wide"), seed=3, hidden_size=256, num_attention_heads=8,
                     num_key_value_heads=4, intermediate_size=512)


def ids_for(path) -> torch.Tensor:
    return random_tokens(json.loads((path / "config.json").read_text())["vocab_size"]).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits_are_as_close_to_float32_as_transformers(wide, dtype):
    from transformers import LlamaForCausalLM

    ids = ids_for(wide)
    with torch.no_grad():
        exact = LlamaForCausalLM.from_pretrained(wide, dtype=torch.float32).cuda()(ids).logits
        theirs = LlamaForCausalLM.from_pretrained(wide, dtype=dtype).cuda()(ids).logits.float()
        ours = llamita.load_model(wide, dtype=dtype, device="cuda")(ids).float()
    err_theirs = (theirs - exact).abs().max().item()
    err_ours = (ours - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3 * (exact.max() - exact.min()).item(), (err_ours, err_theirs)


def test_int4_model_on_cuda_tracks_the_float_model(wide):
    ids = ids_for(wide)
    with torch.no_grad():
        exact = llamita.load_model(wide, dtype=torch.float32, device="cuda")(ids).float()
        int4 = llamita.load_model(wide, device="cuda", quantize="int4")(ids).float()
    assert F.cosine_similarity(int4.flatten(), exact.flatten(), dim=0) > 0.99
    assert llamita.LLM.load(wide, device="cuda", quantize="int4").generate("a", **GREEDY)  # decodes, tinygemm


def test_greedy_generation_on_cuda_equals_the_cpu(base):
    cpu = llamita.LLM.load(base, quantize="none").generate(PROMPT, **GREEDY)
    gpu = llamita.LLM.load(base, device="cuda", dtype=torch.float32, quantize="none")
    assert gpu.generate(PROMPT, **GREEDY) == cpu
    assert gpu.generate_batch([PROMPT, "casa verde grande"], **GREEDY)[0] == cpu  # batched rows, own positions
    compiled = llamita.LLM.load(base, device="cuda", dtype=torch.float32, quantize="none", compile=True)
    assert compiled.generate(PROMPT, **GREEDY) == cpu  # CUDA graphs writing the cache in place
    assert compiled.generate(PROMPT + " casa", **GREEDY) == llamita.LLM.load(base, quantize="none").generate(
        PROMPT + " casa", **GREEDY)  # the next call replays the same graph over the cache it kept


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_train_on_cuda(base, tmp_path, method):
    """The first loss (adapters start at zero: the base model's) equals the CPU's in float32 (QLoRA's
    base too, instead of its default bfloat16); the adapters' random init and dropout masks come from
    each device's own generator, so later steps differ, and must still learn (every step sees all 12
    records); bfloat16 autocast (CUDA's default) learns too."""
    data = write_data(tmp_path / "data.jsonl")
    runs = {}
    options = {**FAST, "batch_size": 12}
    for name, device, precision, dtype in [("cpu", "cpu", "fp32", "float32"), ("cuda", "cuda", "fp32", "float32"),
                                           ("bf16", "cuda", "auto", None)]:
        llamita.finetune(base, data, tmp_path / name, method=method, steps=6, device=device, precision=precision,
                         dtype=dtype, **options)
        runs[name] = losses(tmp_path / name)
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-4)
    assert runs["bf16"][0] == pytest.approx(runs["cpu"][0], rel=2e-2)
    for name in ("cuda", "bf16"):
        assert runs[name][-1] < runs[name][0], (name, runs[name])
    assert (tmp_path / "bf16" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp2_and_ddp_on_nccl_step_as_one_plain_process(tmp_path):
    """One process in an NCCL group: FSDP2 (llamita's sharding) and DDP give the plain model's loss
    and updated weights."""
    from torch.nn.parallel import DistributedDataParallel

    from llamita.train import shard

    ids = random_tokens(211).cuda()

    def one_step(wrap) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = Llama(Config(dim=64, n_layers=2, n_heads=4, vocab_size=211, hidden_dim=128)).cuda()
        net = wrap(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = F.cross_entropy(net(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                   for k, v in model.state_dict().items()}
        return loss.item(), weights

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        plain_loss, plain = one_step(lambda m: m)
        for wrap in (shard, DistributedDataParallel):
            loss, weights = one_step(wrap)
            assert loss == pytest.approx(plain_loss, rel=1e-6)
            for name, w in plain.items():
                torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_server_round_trip_on_cuda(base):
    messages = [{"role": "user", "content": PROMPT}]
    want = llamita.LLM.load(base, device="cuda", dtype=torch.float32, quantize="none").chat(messages, **GREEDY)
    with running_server("--model", str(base), "--device", "cuda", "--dtype", "float32") as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                           json={"messages": messages, "max_tokens": 12, "temperature": 0}).json()
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["usage"]["completion_tokens"] > 0
