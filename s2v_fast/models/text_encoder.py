"""umT5-XXL text encoder (spec §6) on top of transformers' ``UMT5EncoderModel``.

The official checkpoint ``models_t5_umt5-xxl-enc-bf16.pth`` (a plain ``torch.save`` state dict in
the Wan ``T5Encoder`` naming) is mapped onto the transformers layout with :func:`map_official_key`
(table in :data:`KEY_MAP_DOC`). The config is inferred from the tensor shapes
(:func:`config_from_state_dict`). The model is built on the meta device and the (mmapped)
checkpoint tensors are assigned, so the 11 GB file is never held twice.

What transformers computes, checked against spec §6 (transformers 5.x, ``modeling_umt5.py``):

* RMS norm (``UMT5LayerNorm``): mean of squares in fp32, ``x * rsqrt`` cast to the weight dtype
  when that is fp16/bf16, then times the weight. Same as the reference.
* Attention: ``UMT5Attention.scaling = 1.0``, i.e. **no 1/sqrt(d)**, logits = q.k + bias. Same.
* Relative position bias: per layer (every UMT5 layer has ``has_relative_attention_bias=True``),
  bidirectional bucketing with 32 buckets / max distance 128; same formula as the reference
  (key_pos - query_pos, 16*[rel > 0] + log buckets, clamp at 15).
* FFN (``feed_forward_proj='gated-gelu'`` -> ``gelu_new``): ``wo(gelu_tanh(wi_0 x) * wi_1 x)``,
  with GELU written elementwise (0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3)))) like the reference.
* **Difference**: transformers' ``eager`` attention does the softmax in the activation dtype
  (bf16 in production) and ``sdpa`` uses a fused kernel; the reference does
  ``softmax(attn.float()).type_as(attn)``. We therefore register our own attention function
  (``"s2v_umt5_ref"``, :func:`_umt5_reference_attention`): bias = position bias with padded keys
  *replaced* by ``finfo(dtype).min`` (reference ``masked_fill``), logits = q.k + bias, softmax in
  fp32, cast back, then @ v. In fp32 this is bit-identical to eager (tested); in bf16 it follows the reference.
* The padded query rows are computed too (they are discarded by :meth:`TextEncoder.encode`).
"""
from __future__ import annotations

import html
import io
import itertools
import json
import os
import re

import torch

from s2v_fast.errors import CheckpointError

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "T5_CHECKPOINT_NAME",
    "T5_TOKENIZER_SUBDIR",
    "TextEncoder",
    "clean_prompt",
    "config_from_state_dict",
    "make_tiny_tokenizer",
    "map_official_key",
    "map_official_state_dict",
]

T5_CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_SUBDIR = os.path.join("google", "umt5-xxl")
TEXT_LEN = 512

# S2V-specific default negative prompt (spec §3.1), exact string.
DEFAULT_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

KEY_MAP_DOC = {
    "token_embedding.weight": "shared.weight (tied: encoder.embed_tokens.weight)",
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "blocks.{i}.attn.{q,k,v,o}.weight": "encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight",
    "blocks.{i}.pos_embedding.embedding.weight":
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "blocks.{i}.ffn.gate.0.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",
    "blocks.{i}.ffn.fc1.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
    "blocks.{i}.ffn.fc2.weight": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}

_BLOCK_SUFFIX = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def map_official_key(key: str) -> list[str]:
    """Official ``T5Encoder`` key -> list of transformers ``UMT5EncoderModel`` keys.

    Raises ``KeyError`` for a key that is not part of the umT5 encoder layout."""
    if key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    m = _BLOCK_RE.match(key)
    if m and m.group(2) in _BLOCK_SUFFIX:
        return [f"encoder.block.{m.group(1)}.{_BLOCK_SUFFIX[m.group(2)]}"]
    raise KeyError(key)


def map_official_state_dict(state_dict: dict) -> dict:
    """Rename every tensor; the tied embedding appears under both HF names (same tensor)."""
    out, bad = {}, []
    for k, v in state_dict.items():
        try:
            for nk in map_official_key(k):
                out[nk] = v
        except KeyError:
            bad.append(k)
    if bad:
        raise CheckpointError(
            f"T5 checkpoint has {len(bad)} unexpected key(s) (e.g. {bad[0]!r}); "
            "pass the official models_t5_umt5-xxl-enc-bf16.pth (umT5 encoder, per-layer position bias)"
        )
    return out


def config_from_state_dict(state_dict: dict):
    """``UMT5Config`` inferred from official-layout tensor shapes (spec §6)."""
    from transformers import UMT5Config

    try:
        vocab, d_model = state_dict["token_embedding.weight"].shape
        layers = sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))})
        num_layers = len(layers)
        if num_layers == 0 or layers != list(range(num_layers)):
            raise KeyError("blocks.{i}")
        buckets, heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
        inner = state_dict["blocks.0.attn.q.weight"].shape[0]
        d_ff = state_dict["blocks.0.ffn.gate.0.weight"].shape[0]
    except (KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"T5 checkpoint is missing or has malformed tensor {e}; "
            "pass the official models_t5_umt5-xxl-enc-bf16.pth"
        ) from None
    if inner % heads:
        raise CheckpointError(
            f"T5 checkpoint: attention width {inner} is not a multiple of {heads} heads; checkpoint is malformed"
        )
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // heads),
        d_ff=int(d_ff),
        num_layers=int(num_layers),
        num_decoder_layers=0,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=True,
    )


# ------------------------------------------------------------------------------------------------
# attention with the reference numerics (fp32 softmax, masked_fill of the bias)

_ATTN_NAME = "s2v_umt5_ref"


def _umt5_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              position_bias=None, **kwargs):
    attn = torch.matmul(query, key.transpose(2, 3))
    if scaling is not None and scaling != 1.0:
        attn = attn * scaling
    if position_bias is not None:
        bias = position_bias.to(attn.dtype)
        if attention_mask is not None:
            masked = attention_mask < 0 if attention_mask.dtype != torch.bool else ~attention_mask
            bias = bias.masked_fill(masked, torch.finfo(attn.dtype).min)
        attn = attn + bias
    elif attention_mask is not None:
        attn = attn + attention_mask.to(attn.dtype)
    attn = torch.softmax(attn.float(), dim=-1).type_as(attn)
    out = torch.matmul(attn, value).transpose(1, 2).contiguous()
    return out, attn


_REGISTERED = False


def _register_attention():
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_ATTN_NAME, _umt5_reference_attention)
    AttentionMaskInterface.register(_ATTN_NAME, eager_mask)
    _REGISTERED = True


def build_umt5(config, device="meta"):
    """``UMT5EncoderModel`` with the reference attention numerics, parameters on ``device``."""
    from transformers import UMT5EncoderModel

    _register_attention()
    config._attn_implementation = _ATTN_NAME
    with torch.device(device):
        model = UMT5EncoderModel(config)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# prompt cleaning / tokenizer


def clean_prompt(text: str) -> str:
    """ftfy.fix_text, HTML-unescape twice, strip, collapse whitespace (reference 'whitespace' clean)."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


_TINY_SUBJ = ["a young woman", "an old man", "the singer", "a little girl", "the teacher", "a smiling boy",
              "the news anchor", "a musician", "two friends", "my grandmother"]
_TINY_VERB = ["is singing", "talks quietly", "speaks clearly", "laughs happily", "looks at the camera",
              "nods slowly", "explains something", "waves her hand", "plays the guitar", "reads a story",
              "drinks coffee", "turns around"]
_TINY_PLACE = ["on a bright stage", "in a quiet room", "under warm lights", "beside a window",
               "in front of a blue wall", "at the park", "during the evening", "with soft music",
               "near the ocean", "inside a busy kitchen", "on a snowy mountain", "through the forest"]
_TINY_EXTRA = [
    "The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs.",
    "Sphinx of black quartz, judge my vow!", "How vexingly quick daft zebras jump.",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? ' \" - ( ) :",
    "Cinematic lighting, shallow depth of field, realistic skin texture, natural expression.",
    "Her voice is gentle and expressive; his movements are calm and confident.",
    "Yesterday we visited an amazing museum full of colorful paintings and ancient sculptures.",
]


def make_tiny_tokenizer(directory: str, vocab_size: int = 256) -> str:
    """Write a tiny T5-style sentencepiece tokenizer dir loadable by ``AutoTokenizer`` offline.

    Unigram model trained in-process on a built-in English corpus (deterministic;
    ``min(vocab_size, 172)`` pieces: the corpus supports at most 172, so ids always fit a model
    with ``vocab_size`` rows; ``vocab_size`` must be >= ~64 to hold every corpus character). ``<pad>``=0, ``</s>``=1, ``<unk>``=2, no BOS,
    no extra ids. Returns ``directory``."""
    import sentencepiece as spm

    corpus = [f"{s} {v} {p}." for s, v, p in itertools.product(_TINY_SUBJ, _TINY_VERB, _TINY_PLACE)]
    corpus += _TINY_EXTRA
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    cfg = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "additional_special_tokens": [],
           "model_max_length": TEXT_LEN, **special}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2, sort_keys=True)
    return directory


def load_tokenizer(path: str):
    if not os.path.isdir(path):
        raise CheckpointError(
            f"T5 tokenizer directory not found: {path}; download google/umt5-xxl into the checkpoint dir"
        )
    from transformers import AutoTokenizer

    try:
        # tokenizer.json / spiece.model are data; no auto_map code is ever imported
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure is a broken tokenizer dir
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot load T5 tokenizer from {path} ({msg}); re-download google/umt5-xxl (spiece.model/tokenizer.json)"
        ) from None


def load_t5_state_dict(path: str) -> dict:
    """``models_t5_umt5-xxl-enc-bf16.pth`` through ``torch.load(weights_only=True, mmap=True)``
    only: a file that needs the full unpickler (it could run code) is refused, naming the file."""
    from s2v_fast.checkpoint import load_tensor_file
    from s2v_fast.hub import repair_hint

    if not os.path.isfile(path):
        raise CheckpointError(f"T5 checkpoint not found: {path}; download {T5_CHECKPOINT_NAME} into the checkpoint dir")
    sd = load_tensor_file(path, "T5 checkpoint", mmap=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"T5 checkpoint {path} is not a state dict of tensors; {repair_hint(path)}")
    return sd


# ------------------------------------------------------------------------------------------------


class TextEncoder:
    """umT5 encoder + tokenizer. ``encode(prompts) -> list of [L_i, d]`` unpadded contexts."""

    def __init__(self, model, tokenizer=None, text_len: int = TEXT_LEN):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self):
        return self.model.shared.weight.device

    @property
    def dtype(self):
        return self.model.shared.weight.dtype

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_state_dict(cls, state_dict: dict, tokenizer=None, device="cpu", dtype=torch.bfloat16,
                        text_len: int = TEXT_LEN):
        """Build from an official-layout state dict; tensors are assigned (moved/cast one at a time)."""
        config = config_from_state_dict(state_dict)
        mapped = map_official_state_dict(state_dict)
        expected_shapes = {}
        model = build_umt5(config, device="meta")
        for k, p in itertools.chain(model.named_parameters(remove_duplicate=False),
                                    model.named_buffers(remove_duplicate=False)):
            expected_shapes[k] = tuple(p.shape)
        missing = sorted(set(expected_shapes) - set(mapped))
        if missing:
            raise CheckpointError(
                f"T5 checkpoint lacks {len(missing)} tensor(s) (e.g. {missing[0]!r}); re-download {T5_CHECKPOINT_NAME}"
            )
        converted = {}
        cache = {}
        for k, v in mapped.items():
            if tuple(v.shape) != expected_shapes.get(k, tuple(v.shape)):
                raise CheckpointError(
                    f"T5 tensor {k} has shape {tuple(v.shape)}, expected {expected_shapes[k]}; checkpoint is malformed"
                )
            if id(v) not in cache:  # the tied embedding is converted once
                cache[id(v)] = v.to(device=device, dtype=dtype)
            converted[k] = cache[id(v)]
        model.load_state_dict(converted, strict=True, assign=True)
        model.encoder.embed_tokens = model.shared  # keep the tie explicit
        leftover = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
        if leftover:
            raise CheckpointError(f"T5 model tensors not loaded: {leftover[:3]}; checkpoint is incomplete")
        return cls(model, tokenizer, text_len)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, device="cpu", dtype=torch.bfloat16, checkpoint: str | None = None,
                        tokenizer_dir: str | None = None, text_len: int = TEXT_LEN):
        """Load ``<ckpt_dir>/models_t5_umt5-xxl-enc-bf16.pth`` + tokenizer ``<ckpt_dir>/google/umt5-xxl``."""
        ckpt_path = checkpoint or os.path.join(ckpt_dir, T5_CHECKPOINT_NAME)
        tok_path = tokenizer_dir or os.path.join(ckpt_dir, T5_TOKENIZER_SUBDIR)
        tokenizer = load_tokenizer(tok_path)
        sd = load_t5_state_dict(ckpt_path)
        enc = cls.from_state_dict(sd, tokenizer=tokenizer, device=device, dtype=dtype, text_len=text_len)
        vocab = enc.model.config.vocab_size
        if len(tokenizer) > vocab:
            raise CheckpointError(
                f"T5 tokenizer at {tok_path} has {len(tokenizer)} tokens but the checkpoint only {vocab}; "
                "tokenizer and checkpoint do not belong together"
            )
        return enc

    # --------------------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]):
        """Reference tokenizer call -> (ids [B, text_len] int64, mask [B, text_len] int64)."""
        if self.tokenizer is None:
            raise RuntimeError("TextEncoder has no tokenizer; use encode_ids()")
        texts = [clean_prompt(p) for p in prompts]
        out = self.tokenizer(texts, return_tensors="pt", padding="max_length", max_length=self.text_len,
                             truncation=True, add_special_tokens=True, return_attention_mask=True)
        return out["input_ids"], out["attention_mask"]

    @torch.inference_mode()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Padded encoder output [B, L, d] (padded rows computed too, like the reference)."""
        dev = self.device
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        return out.last_hidden_state

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> list of unpadded contexts [L_i, d] (L_i = number of mask ones)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(list(prompts))
        out = self.encode_ids(ids, mask)
        lens = mask.gt(0).sum(dim=1).tolist()
        return [out[i, :n] for i, n in enumerate(lens)]

    __call__ = encode
