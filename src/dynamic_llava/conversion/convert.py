"""Convert a LLaVA-1.5 checkpoint (the authors' Dynamic-LLaVA release, the original LLaVA-1.5 layout or a
llava-hf one) into a Dynamic-LLaVA checkpoint that `DynamicLlavaForConditionalGeneration` loads.

The weights stream one source shard at a time (peak memory about one shard, not the model) into
safetensors shards in the source dtype; settings, tokenizer and processor are mapped alongside. Every
source tensor is either placed or named in the report with the reason it is not a weight of the
model; anything else is refused before a byte is written. The output folder appears only complete:
it is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaImageProcessorPil,
    LlavaProcessor,
)
from transformers.utils import logging as hf_logging

from ..config import DynamicLlavaConfig
from ..data import LLAVA_V1_CHAT_TEMPLATE
from .keys import (
    IMAGE_PREDICTOR,
    SKIP,
    TEXT_PREDICTOR,
    UnmappableTensor,
    clip_target,
    llava_hf_target,
    original_target,
)

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-1.5's `llava_v1` conversation template: the Vicuna system prompt unless the chat gives one
LLAVA_V1_SYSTEM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ \"" + VICUNA_SYSTEM + " \" }}{% endif %}" + LLAVA_V1_CHAT_TEMPLATE
)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# the authors' sparse_config keys -> ours; the predictor widths are derived in `_sparsity`
_SPARSE_KEYS = {
    "sparse_layer": "sparse_layer",
    "vision_keep_rate": "image_keep_rate",
    "output_text_keep_rate": "text_keep_rate",
    "output_text_len_for_training": "min_answer_tokens",
    "mask_loss_weight": "budget_weight",
}
_SPARSE_STRUCTURE = ("use_vision_predictor", "use_text_predictor", "use_output_text_predictor", "d_model", "nhead",
                     "dim_feedforward", "num_layers")
_SPARSE_UNUSED = ("use_instruct_predictor", "instruct_keep_rate", "instruct_len_for_training")
_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "attention_bias", "mlp_bias", "head_dim", "initializer_range", "bos_token_id",
                 "eos_token_id")


class ConversionError(ValueError):
    """The source cannot be converted as it is; the message says what is wrong and what to pass."""


@dataclass
class ConversionReport:
    """What `convert` did: the layout it read, tensors written and skipped (with reasons), what is new."""

    layout: str
    output: Path
    tensors: int = 0
    shards: int = 0
    dtype: str = ""
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> tensor names
    fresh_predictors: list[str] = field(default_factory=list)  # "image", "output-text"
    added_tokens: list[str] = field(default_factory=list)
    vocab_rows: tuple[int, int] | None = None  # (source rows, written rows) when the embeddings grew
    ignored_settings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as the command line prints it."""
        out = [f"Read a {self.layout} checkpoint; wrote {self.tensors} tensors in {self.shards} shard(s) "
               f"({self.dtype}) to {self.output}."]
        for reason, names in self.skipped.items():
            out.append(f"Skipped {len(names)} tensor(s): {reason} (e.g. {names[0]}).")
        if self.vocab_rows:
            out.append(f"Added tokens {', '.join(self.added_tokens)}: embeddings and lm_head grow from "
                       f"{self.vocab_rows[0]} to {self.vocab_rows[1]} rows (new rows = the mean row, so greedy "
                       "decoding never picks them).")
        if self.fresh_predictors:
            out.append(f"The source has no trained {' and '.join(self.fresh_predictors)} predictor: the model loads "
                       "with fresh ones; fine-tune them (`dynamic-llava train`) before pruning.")
        if self.ignored_settings:
            out.append(f"Ignored settings the public Dynamic-LLaVA code does not read: {', '.join(self.ignored_settings)}.")
        return out


# ---------------------------------------------------------------------------------------------- reading


class _TensorFiles:
    """The weight files of a folder (safetensors or PyTorch .bin, sharded or not), read one file at a time."""

    def __init__(self, folder: Path, what: str):
        self.folder = folder
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = folder / index_name
            if index.is_file():
                try:
                    self.weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as error:
                    raise ConversionError(f"{index} is not a weight index (a JSON with a weight_map): {error}.")
                self.files = sorted(set(self.weight_map.values()))
                break
            if (folder / single).is_file():
                self.files, self.weight_map = [single], None
                break
        else:
            raise ConversionError(
                f"No weights in {folder} ({what}): expected model.safetensors or pytorch_model.bin, sharded with an "
                "index or not."
            )
        for name in self.files:
            if not (folder / name).is_file():
                raise ConversionError(f"{folder / name} is named in the weight index but missing: download it again.")

    def names(self) -> list[str]:
        """Every tensor name, read from headers or the index (a single .bin file is opened lazily, mmap)."""
        if self.weight_map is not None:
            return list(self.weight_map)
        return list(self._open(self.files[0]))

    def shards(self):
        """Yield (file name, {tensor name: tensor}) one file at a time; tensors are read as they are used."""
        for name in self.files:
            yield name, self._open(name)

    def _open(self, name: str):
        path = self.folder / name
        try:
            if name.endswith(".safetensors"):
                return _LazySafetensors(path)
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:  # a truncated or foreign file: name it
            raise ConversionError(f"{path} cannot be read as a weight file ({type(error).__name__}: {error}).")


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class _LazySafetensors:
    """{name: tensor} over a safetensors file whose tensors are read only when asked for."""

    def __init__(self, path: Path):
        self._file = safe_open(str(path), framework="pt")

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def __iter__(self):
        return iter(self.keys())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype from the file header (nothing read)."""
        return _SAFETENSORS_DTYPES[self._file.get_slice(name).get_dtype()]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"No {path.name} in {path.parent}: {what}.") from None
    except ValueError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}.") from None


def detect_layout(config: dict) -> str:
    """"authors", "llava" or "llava-hf" from a source config.json; refuse other models clearly."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == DynamicLlavaConfig.model_type:
        raise ConversionError("This is a Dynamic-LLaVA checkpoint of this library already: load it directly.")
    if model_type == "llava":
        return "llava-hf"
    if model_type == "llava_llama" or any("LlavaLlama" in a for a in architectures):
        return "authors" if "sparse_config" in config else "llava"
    raise ConversionError(
        f"config.json is for a {model_type!r} model ({', '.join(architectures) or 'no architectures'}): convert reads "
        "the authors' Dynamic-LLaVA, the original LLaVA-1.5 (llava_llama) or a llava-hf (llava) checkpoint."
    )


# ---------------------------------------------------------------------------------------------- settings


def _check_llava_settings(config: dict) -> None:
    """Refuse LLaVA variants the llava-hf LLaVA-1.5 architecture cannot express."""
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type={projector!r}: llava-hf's LLaVA projector is two linear layers with GELU "
            "(mlp2x_gelu, as in LLaVA-1.5); this checkpoint cannot be expressed in it."
        )
    aspect, merge = config.get("image_aspect_ratio", "square"), config.get("mm_patch_merge_type", "flat")
    if "anyres" in str(aspect) or merge != "flat":
        raise ConversionError(
            f"image_aspect_ratio={aspect!r}, mm_patch_merge_type={merge!r}: this is a LLaVA-NeXT (anyres) checkpoint; "
            "LLaVA-1.5 ones (pad or square, flat) are converted."
        )
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(flag):
            raise ConversionError(f"{flag}=true: image start/end or patch tokens are not in the llava-hf format.")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature={feature!r}: expected 'patch' or 'cls_patch'.")


def _sparsity(config: dict, report: ConversionReport) -> dict:
    """Our sparsity settings from the authors' sparse_config (widths such that the published predictors fit)."""
    sparse = config.get("sparse_config")
    if sparse is None:
        return {}
    if not isinstance(sparse, dict):
        raise ConversionError(f"sparse_config must be a JSON object, got {type(sparse).__name__}.")
    if sparse.get("use_instruct_predictor"):
        raise ConversionError(
            "sparse_config has use_instruct_predictor=true: the instruct (prompt-text) predictor is not supported; "
            "convert a checkpoint trained without it."
        )
    known = {*_SPARSE_KEYS, *_SPARSE_STRUCTURE, *_SPARSE_UNUSED}
    unknown = sorted(k for k in sparse if k not in known and not k.startswith("maskclip"))
    if unknown:
        raise ConversionError(
            f"sparse_config has settings this converter does not know: {', '.join(unknown)}; they may change what the "
            "model does, so nothing was converted."
        )
    report.ignored_settings = sorted(k for k in sparse if k.startswith("maskclip"))
    out = {ours: sparse[theirs] for theirs, ours in _SPARSE_KEYS.items() if theirs in sparse}
    out["use_image_predictor"] = bool(sparse.get("use_vision_predictor", False))
    out["use_text_predictor"] = bool(sparse.get("use_text_predictor") and sparse.get("use_output_text_predictor"))
    d_model = int(sparse.get("d_model", 512))
    out.update(predictor_dim=d_model, predictor_heads=int(sparse.get("nhead", 8)),
               predictor_mlp_dim=int(sparse.get("dim_feedforward", 4 * d_model)),
               predictor_blocks=int(sparse.get("num_layers", 2)),
               predictor_head_dims=[d_model // 2, d_model // 4],
               text_predictor_dims=[d_model, d_model // 2, d_model // 4],
               mask_gradient="raw")  # the authors' estimator, so that further fine-tuning follows their recipe
    return out


def _vision_config(tower: Path) -> dict:
    config = _read_json(tower / "config.json", "pass the CLIP vision tower folder (openai/clip-vit-large-patch14-336)")
    if config.get("model_type") == "clip":
        config = config.get("vision_config") or {}
    elif config.get("model_type") != "clip_vision_model":
        raise ConversionError(
            f"{tower} holds a {config.get('model_type')!r} model: --vision-tower takes a CLIP folder "
            "(openai/clip-vit-large-patch14-336)."
        )
    return CLIPVisionConfig.from_dict(config).to_dict()


def _text_config(config: dict, vocab: int, pad_id: int) -> dict:
    text = {k: config[k] for k in _LLAMA_FIELDS if config.get(k) is not None}
    scaling, theta = text.pop("rope_scaling", None), text.pop("rope_theta", 10000.0)
    rope = {"rope_type": "default"}
    if scaling:  # the 4.x spelling ({"type": "linear", "factor": 2.0}) as 5.x rope_parameters
        rope = {k: v for k, v in scaling.items() if k != "type"}
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    text["rope_parameters"] = {**rope, "rope_theta": theta}
    return LlamaConfig(**text, vocab_size=vocab, pad_token_id=pad_id, tie_word_embeddings=False).to_dict()


# ---------------------------------------------------------------------------------------------- processor


def _tokenizer(folder: Path, source_rows: int):
    """The source tokenizer as shipped (tokenizer.model or tokenizer.json) with <image> and <pad> added."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConversionError(
            f"No tokenizer in {folder} (tokenizer.model or tokenizer.json): pass --tokenizer DIR, e.g. the LLaVA-1.5 "
            "or Vicuna-1.5 folder it was trained with."
        )
    try:
        with warnings.catch_warnings(), _quiet_transformers():  # it reads the folder's LLaVA config.json: expected
            warnings.simplefilter("ignore", FutureWarning)
            # <image> first, so that it gets id 32000 as in llava-hf, then <pad>
            tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens={"image_token": "<image>"})
    except Exception as error:
        raise ConversionError(f"The tokenizer in {folder} cannot be read ({type(error).__name__}: {error}).")
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"  # batched generation
    if len(tokenizer) < source_rows - 64:  # far fewer tokens than rows: another model's tokenizer
        raise ConversionError(f"The tokenizer in {folder} has {len(tokenizer)} tokens for a model with {source_rows} "
                              "embedding rows: pass the tokenizer this model was trained with (--tokenizer).")
    return tokenizer


@contextmanager
def _quiet_transformers():
    """transformers' warnings off for a moment (reading a LLaVA config.json for its tokenizer is expected)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _image_processor(tower: Path, pad_to_square: bool) -> LlavaImageProcessorPil:
    settings = _read_json(tower / "preprocessor_config.json", "the CLIP folder's image settings are needed")
    keep = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "do_convert_rgb", "resample")
    return LlavaImageProcessorPil(**{k: settings[k] for k in keep if k in settings}, do_pad=pad_to_square)


# ---------------------------------------------------------------------------------------------- convert


def convert(
    source,
    output,
    *,
    vision_tower=None,
    tokenizer=None,
    dtype: str | None = None,
    max_shard_size: int = 5 * 2**30,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the checkpoint folder ``source`` into a Dynamic-LLaVA checkpoint folder ``output``.

    vision_tower: a CLIP folder (needed when the source does not store the tower, as LLaVA-1.5 releases do
        not; default: the source config's ``mm_vision_tower`` when it is a local folder).
    tokenizer: a folder with the tokenizer (default: the source).
    dtype: "float16", "bfloat16" or "float32" (default: the language model's dtype in the source).
    overwrite: replace an existing ``output`` (only once the new one is complete).
    """
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise ConversionError(f"Source checkpoint folder not found: {source}.")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
    if not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ConversionError(f"max_shard_size={max_shard_size!r}: give a positive number of bytes.")
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise ConversionError(f"{output} exists and is not empty: pass another folder, or overwrite=True (--overwrite).")
    if output.resolve() == source.resolve():
        raise ConversionError("The output folder is the source folder: write the conversion elsewhere.")
    config = _read_json(source / "config.json", "pass a LLaVA checkpoint folder")
    layout = detect_layout(config)
    report = ConversionReport(layout={"authors": "Dynamic-LLaVA (authors' layout)", "llava": "LLaVA-1.5 (original "
                                      "layout)", "llava-hf": "llava-hf"}[layout], output=output)
    if layout == "llava-hf":
        plan = _plan_llava_hf(source, config, tokenizer, report)
    else:
        plan = _plan_original(source, config, vision_tower, tokenizer, report, layout)
    _write(plan, output, dtype, max_shard_size, report, layout)
    return report


@dataclass
class _Plan:
    config: DynamicLlavaConfig
    processor: LlavaProcessor
    sources: list[tuple[_TensorFiles, callable]]  # weight folders and how their names map
    expected: dict[str, torch.Size]  # every tensor our model holds, with its shape


def _plan_original(source, config, vision_tower, tokenizer, report, layout) -> _Plan:
    _check_llava_settings(config)
    sparsity = _sparsity(config, report)
    files = _TensorFiles(source, "the LLaVA checkpoint")
    names = files.names()
    stores_tower = any(n.startswith("model.vision_tower.vision_tower.") for n in names)
    tower = Path(vision_tower) if vision_tower is not None else None
    if tower is None and Path(str(config.get("mm_vision_tower", ""))).is_dir():
        tower = Path(config["mm_vision_tower"])
    if tower is None:
        raise ConversionError(
            f"{source} does not hold the CLIP settings{'' if stores_tower else ' or weights'} of its vision tower "
            f"({config.get('mm_vision_tower', 'mm_vision_tower unset')}): pass vision_tower= / --vision-tower DIR, "
            "a local copy of that CLIP folder."
        )
    if not tower.is_dir():
        raise ConversionError(f"Vision tower folder not found: {tower}.")
    source_rows = config.get("vocab_size")
    if not isinstance(source_rows, int) or source_rows < 1:
        raise ConversionError(f"config.json has vocab_size={source_rows!r}: a LLaVA config gives its vocabulary size.")
    tok = _tokenizer(Path(tokenizer) if tokenizer else source, source_rows)
    report.added_tokens = tok.convert_ids_to_tokens(list(range(source_rows, len(tok))))
    vision = _vision_config(tower)
    strategy = "default" if config.get("mm_vision_select_feature", "patch") == "patch" else "full"
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    rows = max(source_rows, 64 * math.ceil(len(tok) / 64))  # llava-hf pads the rows to a multiple of 64
    ours = DynamicLlavaConfig(
        text_config=_text_config(config, rows, tok.pad_token_id),
        vision_config={**vision, "model_type": "clip_vision_model"},
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        image_seq_length=patches + (strategy == "full"),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        **sparsity,
    )
    processor = LlavaProcessor(
        image_processor=_image_processor(tower, config.get("image_aspect_ratio") == "pad"),
        tokenizer=tok,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=tok.chat_template or LLAVA_V1_SYSTEM_CHAT_TEMPLATE,  # the one shipped, else llava_v1's
    )
    sources = [(files, original_target)]
    if not stores_tower:
        sources.append((_TensorFiles(tower, "the CLIP vision tower"), clip_target))
    return _Plan(ours, processor, sources, _expected_tensors(ours))


def _plan_llava_hf(source, config, tokenizer, report) -> _Plan:
    try:
        ours = DynamicLlavaConfig.from_pretrained(source)
        processor = AutoProcessor.from_pretrained(tokenizer or source)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"{source} cannot be read as a llava-hf checkpoint with its processor: {error}")
    return _Plan(ours, processor, [(_TensorFiles(source, "the llava-hf checkpoint"), llava_hf_target)],
                 _expected_tensors(ours))


def _expected_tensors(config: DynamicLlavaConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the model `config` builds (on the meta device: nothing allocated)."""
    from ..modeling import DynamicLlavaForConditionalGeneration

    with torch.device("meta"):
        model = DynamicLlavaForConditionalGeneration(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _mapped_names(plan: _Plan, report: ConversionReport, layout: str) -> dict[str, tuple[int, str]]:
    """Check the whole mapping before anything is written; returns target -> (source folder index, name)."""
    targets: dict[str, tuple[int, str]] = {}
    for index, (files, target_of) in enumerate(plan.sources):
        for name in files.names():
            try:
                target, reason = target_of(name)
            except UnmappableTensor as error:
                raise ConversionError(f"Cannot convert {files.folder}: {error} Nothing was written.") from None
            if target is SKIP:
                report.skipped.setdefault(reason, []).append(name)
                continue
            if target not in plan.expected:
                raise ConversionError(
                    f"Cannot convert {files.folder}: {name} maps to {target}, which the model does not have "
                    "(a predictor setting or the model shape differs from the config). Nothing was written."
                )
            if target in targets:
                raise ConversionError(f"{name} and {targets[target][1]} both map to {target}: the source is ambiguous.")
            targets[target] = (index, name)
    needed = [n for n in plan.expected if n not in targets and "_predictor." not in n]
    if needed:
        raise ConversionError(
            f"The source lacks {len(needed)} tensor(s) the model needs, e.g. {needed[0]}: the checkpoint is incomplete "
            "(or its vision tower is stored elsewhere: pass --vision-tower). Nothing was written."
        )
    fresh = []
    for kind, prefix, enabled in (("image", IMAGE_PREDICTOR, plan.config.use_image_predictor),
                                  ("output-text", TEXT_PREDICTOR, plan.config.use_text_predictor)):
        wanted = [n for n in plan.expected if n.startswith(prefix) and not n.endswith("in_proj_bias")]
        present = [n for n in wanted if n in targets]
        if not enabled:
            continue
        if not present:
            if layout == "authors":
                raise ConversionError(
                    f"sparse_config enables the {kind} predictor but the weights hold none: the checkpoint is "
                    "incomplete. Nothing was written."
                )
            fresh.append(kind)
        elif len(present) < len(wanted):
            missing = next(n for n in wanted if n not in targets)
            raise ConversionError(f"The {kind} predictor is incomplete in the source ({missing} is missing). "
                                  "Nothing was written.")
    report.fresh_predictors = fresh
    return targets


def _write(plan: _Plan, output: Path, dtype, max_shard_size, report: ConversionReport, layout: str) -> None:
    targets = _mapped_names(plan, report, layout)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    try:
        _stream_tensors(plan, targets, work, DTYPES[dtype] if dtype else _source_dtype(plan, targets), max_shard_size,
                        report)
        plan.config.dtype = report.dtype
        plan.config.architectures = ["DynamicLlavaForConditionalGeneration"]
        plan.config.save_pretrained(work)
        text = plan.config.text_config
        GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                         pad_token_id=text.pad_token_id).save_pretrained(work)
        plan.processor.save_pretrained(work)
        if output.exists():  # replaced only now that the new one is complete
            previous = output.with_name(f".{output.name}.previous-{os.getpid()}")
            output.rename(previous)
            work.rename(output)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            work.rename(output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _source_dtype(plan: _Plan, targets) -> torch.dtype:
    """The language model's dtype in the source: that of its embeddings."""
    index, name = targets["model.language_model.embed_tokens.weight"]
    files = plan.sources[index][0]
    shard = files._open(files.weight_map[name] if files.weight_map is not None else files.files[0])
    return shard.dtype(name) if isinstance(shard, _LazySafetensors) else shard[name].dtype  # .bin: mmap, unread


def _stream_tensors(plan, targets, work: Path, dtype: torch.dtype, max_shard_size: int, report) -> None:
    """Write the mapped tensors, one source file at a time, into output shards of at most ~max_shard_size."""
    wanted = [{} for _ in plan.sources]  # per source folder: source name -> target
    for target, (index, name) in targets.items():
        wanted[index][name] = target
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, shard_names, weight_map = 0, [], {}

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"part-{len(shard_names):05d}.safetensors"
            save_file(pending, str(work / name), metadata={"format": "pt"})
            shard_names.append(name)
            weight_map.update(dict.fromkeys(pending, name))
            pending, pending_bytes = {}, 0

    for index, (files, _) in enumerate(plan.sources):
        for _, tensors in files.shards():
            for name in tensors.keys():
                target = wanted[index].get(name)
                if target is None:
                    continue
                tensor = _fit(target, tensors[name], plan, report)
                tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
                pending[target] = tensor.contiguous()
                bias = target.replace("in_proj_weight", "in_proj_bias")
                if bias != target and bias not in targets:  # the authors' qkv projection has no bias
                    pending[bias] = torch.zeros(tensor.shape[0], dtype=tensor.dtype)
                pending_bytes += tensor.numel() * tensor.element_size()
                if pending_bytes >= max_shard_size:
                    flush()
            del tensors
    flush()
    if not weight_map:
        raise ConversionError("No tensor was written: the source holds no weights.")
    report.dtype = str(dtype).removeprefix("torch.")
    report.tensors, report.shards = len(weight_map), len(shard_names)
    final = {}
    for i, name in enumerate(shard_names):
        final[name] = "model.safetensors" if len(shard_names) == 1 else \
            f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors"
        (work / name).rename(work / final[name])
    if len(shard_names) > 1:
        size = sum((work / f).stat().st_size for f in final.values())
        index = {"metadata": {"total_size": size}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _fit(target: str, tensor: torch.Tensor, plan: _Plan, report: ConversionReport) -> torch.Tensor:
    """Check the shape; grow the embeddings and lm_head to the new vocabulary with mean rows."""
    want = plan.expected[target]
    if target in ("model.language_model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] < want[0]:
        if tensor.shape[1:] != want[1:]:
            raise ConversionError(f"{target}: shape {list(tensor.shape)} does not fit {list(want)}.")
        mean = tensor.double().mean(dim=0, keepdim=True).to(tensor.dtype)
        report.vocab_rows = (tensor.shape[0], want[0])
        return torch.cat([tensor, mean.expand(want[0] - tensor.shape[0], -1)], dim=0)
    if tensor.shape != want:
        raise ConversionError(
            f"{target}: the source tensor has shape {list(tensor.shape)} but the model needs {list(want)}: the "
            "config and the weights disagree (or the predictor widths do)."
        )
    return tensor


__all__ = ["ConversionError", "ConversionReport", "LLAVA_V1_SYSTEM_CHAT_TEMPLATE", "VICUNA_SYSTEM", "convert",
           "detect_layout"]
