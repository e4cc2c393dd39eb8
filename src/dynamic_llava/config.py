"""Model configuration: a `LlavaConfig` plus the sparsity settings, saved in `config.json`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from .validation import check_bool, check_integer, check_integer_list, check_number, check_rate, invalid

# Settings that shape the predictor modules: changing them under a built model would not change the model.
STRUCTURE_FIELDS = (
    "use_image_predictor",
    "use_text_predictor",
    "predictor_dim",
    "predictor_heads",
    "predictor_mlp_dim",
    "predictor_blocks",
    "predictor_head_dims",
    "text_predictor_dims",
)

SPARSITY_FIELDS = ("sparse_layer", "image_keep_rate", "text_keep_rate", *STRUCTURE_FIELDS, "budget_weight",
                   "min_answer_tokens", "mask_gradient", "image_mask_sampling", "image_selection", "image_relevance")
MASK_GRADIENTS = ("balanced", "raw")
IMAGE_MASK_SAMPLINGS = ("gumbel", "top_share")
IMAGE_SELECTIONS = ("top", "diverse")


def check_setting(name: str, value, num_layers: int) -> None:
    """Raise `TypeError` / `ValueError` when sparsity setting ``name`` cannot take ``value`` (``num_layers``: L)."""
    if name == "sparse_layer":
        if num_layers < 2:
            raise invalid(name, value, f"a layer in [1, L-1], but the language model has L={num_layers} layer")
        check_integer(name, value, 1, num_layers - 1,
                      f"layer K of a language model with {num_layers} layers (the paper uses 2)")
    elif name in ("image_keep_rate", "text_keep_rate"):
        check_rate(name, value)
    elif name in ("use_image_predictor", "use_text_predictor"):
        check_bool(name, value)
    elif name in ("predictor_dim", "predictor_mlp_dim") and value is None:
        return  # derived from the hidden size at construction
    elif name in ("predictor_dim", "predictor_heads", "predictor_mlp_dim", "predictor_blocks", "min_answer_tokens"):
        check_integer(name, value, 1)
    elif name in ("predictor_head_dims", "text_predictor_dims"):
        if value is not None:
            check_integer_list(name, value, 1)
    elif name == "budget_weight":
        check_number(name, value, 0.0)
    elif name == "mask_gradient" and value not in MASK_GRADIENTS:
        raise invalid(name, value, " or ".join(repr(m) for m in MASK_GRADIENTS),
                      "'raw' is the authors' estimator, 'balanced' lets the budget set how many tokens are kept",
                      kind=TypeError if not isinstance(value, str) else ValueError)
    elif name == "image_selection" and value not in IMAGE_SELECTIONS:
        raise invalid(name, value, " or ".join(repr(m) for m in IMAGE_SELECTIONS),
                      "'top' keeps the highest learned scores (the paper's), 'diverse' trades near-duplicates for "
                      "distinct tokens", kind=TypeError if not isinstance(value, str) else ValueError)
    elif name == "image_relevance":
        check_number(name, value, 0.0, 1.0, hint="the learned score's weight in the diverse selection's quality")
    elif name == "image_mask_sampling" and value not in IMAGE_MASK_SAMPLINGS:
        raise invalid(name, value, " or ".join(repr(m) for m in IMAGE_MASK_SAMPLINGS),
                      "'gumbel' is the paper's per-token sample, 'top_share' keeps each image's inference share",
                      kind=TypeError if not isinstance(value, str) else ValueError)


def refuse_misspelt_settings(names) -> None:
    """Raise `ValueError` for a keyword that is not a sparsity setting but nearly spells one (``image_keep_rat``):
    the config would keep it as an unused attribute and the setting meant would silently stay at its default."""
    for name in names:
        if name not in SPARSITY_FIELDS:
            close = difflib.get_close_matches(name, SPARSITY_FIELDS, n=1, cutoff=0.85)
            if close:
                raise ValueError(f"{name}: not a Dynamic-LLaVA setting; did you mean {close[0]}?")


@dataclass(kw_only=True, repr=False)
class SparsitySettings:
    r"""The Dynamic-LLaVA settings a model config carries besides its family's own (mixed into
    `DynamicLlavaConfig` and the other families' configs; saved in `config.json`).

    Parameters
    ----------
    sparse_layer : int
        Decoder layer K whose input the predictors read; layers K..L-1 see only kept tokens.
    image_keep_rate : float
        Share of each image's tokens kept at prefill (``floor(rate * tokens)``); 1.0 keeps all.
    text_keep_rate : float
        Training target for the share of output-text tokens kept; 1.0 turns output-text
        sparsification off at inference as well.
    use_image_predictor, use_text_predictor : bool
        Which predictors exist ("I" model: image only; "I|T": both).
    predictor_dim, predictor_heads, predictor_mlp_dim, predictor_blocks, predictor_head_dims :
        Image predictor widths (paper: 512, 8, 2048, 2 blocks, head 256 -> 128 -> 2). Unset widths
        are derived from the language model's hidden size: the paper's at 4096, smaller below.
    text_predictor_dims :
        Output-text predictor MLP widths (paper: 512 -> 256 -> 128 -> 2; derived like the above).
    budget_weight : float
        Training: lambda in LM loss + lambda * (R_I + R_OT), the squared gaps to the keep-rate targets.
    min_answer_tokens : int
        Training: the last answer's tokens may be dropped only when it has at least this many.
    mask_gradient : str
        Training: how the LM loss's gradient reaches the keep masks. "raw" is the straight-through
        gradient as is (the authors' code). "balanced" (default) centres it over each sample's
        eligible tokens and rescales it to the size of the budget term's gradient at a gap of one
        half, so that the LM loss decides *which* tokens are kept and the budget term *how many*,
        whatever the size of the LM's gradient (`losses.balance_mask_gradient`). It needs
        budget_weight > 0.
    image_mask_sampling : str
        Training: how the image keep mask is drawn. "gumbel" (default, the paper's) samples each image
        token on its own (hard Gumbel-Softmax), so the number kept varies around the target. "top_share"
        keeps exactly what inference keeps, each image's top floor(rate x tokens) by the predictor's
        score plus logistic noise, with the same straight-through gradient: the language model is
        fine-tuned on inputs shaped as inference gives them.
    image_selection : str
        Which image tokens the learned predictor's scores keep. "top" (default, the paper's): each image's
        highest keep probabilities. "diverse": greedy DPP over the tokens' layer-K hidden states with the
        keep probability as quality (`policies.learned_image_scores`), so several patches of one object
        give way to distinct ones. Training under "top_share" sampling chooses the same way.
    image_relevance : float
        Under "diverse": the keep probability's weight in the quality, in [0, 1] (the rest is uniform).
    """

    sparse_layer: int = 2
    image_keep_rate: float = 0.2
    text_keep_rate: float = 0.5
    use_image_predictor: bool = True
    use_text_predictor: bool = True
    predictor_dim: int | None = None
    predictor_heads: int = 8
    predictor_mlp_dim: int | None = None
    predictor_blocks: int = 2
    predictor_head_dims: list[int] | tuple[int, ...] | None = None
    text_predictor_dims: list[int] | tuple[int, ...] | None = None
    budget_weight: float = 100.0
    min_answer_tokens: int = 50
    mask_gradient: str = "balanced"
    image_mask_sampling: str = "gumbel"
    image_selection: str = "top"
    image_relevance: float = 0.8

    # the stock model types this config also reads (they get default sparsity settings)
    base_model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""  # for messages: "LLaVA", "Qwen2-VL"

    def __post_init__(self, **kwargs):
        refuse_misspelt_settings(kwargs)
        super().__post_init__(**kwargs)
        for name in ("predictor_heads", "predictor_dim", "predictor_head_dims", "text_predictor_dims"):  # read below
            if getattr(self, name) is not None:
                check_setting(name, getattr(self, name), self.text_config.num_hidden_layers)
        self._fill_predictor_widths()
        self.check_sparsity()

    def _fill_predictor_widths(self) -> None:
        """Widths left unset follow the paper at hidden size 4096 (512 / 2048 / 256-128 / 512-256-128)
        and shrink with smaller models: dim = min(512, hidden / 8), so the predictors stay ~1% of a layer."""
        if self.predictor_dim is None:
            unit = 2 * self.predictor_heads
            self.predictor_dim = max(unit, min(512, self.text_config.hidden_size // 8) // unit * unit)
        dim = self.predictor_dim
        if self.predictor_mlp_dim is None:
            self.predictor_mlp_dim = 4 * dim
        if self.predictor_head_dims is None:
            self.predictor_head_dims = [max(2, dim // 2), max(2, dim // 4)]
        if self.text_predictor_dims is None:
            self.text_predictor_dims = [dim, max(2, dim // 2), max(2, dim // 4)]
        self.predictor_head_dims = list(self.predictor_head_dims)
        self.text_predictor_dims = list(self.text_predictor_dims)

    def __setattr__(self, name, value):
        """Check a sparsity setting assigned after construction (``model.config.image_keep_rate = ...``)."""
        if name in SPARSITY_FIELDS and self.__dict__.get("_sparsity_ready"):
            check_setting(name, value, self.text_config.num_hidden_layers)
            if name in STRUCTURE_FIELDS and self.__dict__.get("_structure_fixed") and value != getattr(self, name):
                raise ValueError(
                    f"{name}={value!r}: fixed at {getattr(self, name)!r} once a model is built from this config (its "
                    f"predictors exist already); load with from_pretrained(path, {name}=...) or build a new model."
                )
        super().__setattr__(name, value)

    def check_sparsity(self) -> None:
        """Raise a clear `TypeError` / `ValueError` naming the first sparsity setting that cannot work here."""
        num_layers = self.text_config.num_hidden_layers
        for name in SPARSITY_FIELDS:
            check_setting(name, getattr(self, name), num_layers)
        if self.predictor_dim % 2 or self.predictor_dim % self.predictor_heads:
            raise invalid(
                "predictor_dim", self.predictor_dim, f"an even multiple of predictor_heads={self.predictor_heads}",
                "the image predictor splits its width into heads and into two halves",
            )
        if self.mask_gradient == "balanced" and self.budget_weight == 0:
            raise invalid(
                "budget_weight", self.budget_weight, "> 0 with mask_gradient='balanced'",
                "balanced mask gradients are sized by it, so the predictors would learn nothing; "
                "use mask_gradient='raw' to train them on the LM loss alone",
            )
        self.__dict__["_sparsity_ready"] = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`PreTrainedConfig.from_pretrained`; a refused setting (in config.json or an override) names the folder."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (TypeError, ValueError) as error:
            if type(error) not in (TypeError, ValueError) or str(pretrained_model_name_or_path) in str(error):
                raise
            overrides = sorted(set(kwargs) & set(SPARSITY_FIELDS))
            where = f"config.json in {pretrained_model_name_or_path}" + (
                f" with overrides {', '.join(overrides)}" if overrides else ""
            )
            raise type(error)(f"{where}: {error}") from error

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Read a `dynamic_llava` config, or a plain `llava` one (which then gets default sparsity settings), with
        sparsity-setting overrides merged in; refuse a config of another model type."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type not in (*cls.base_model_types, cls.model_type):
            readable = " or ".join(repr(t) for t in (*cls.base_model_types, cls.model_type))
            raise ValueError(
                f"The config.json in {pretrained_model_name_or_path} is for a {model_type!r} model, not "
                f"{cls.family}: {cls.__name__} loads {readable} checkpoints."
            )
        if model_type in cls.base_model_types:
            config_dict = {**config_dict, "model_type": cls.model_type}
        overrides = {name: kwargs.pop(name) for name in SPARSITY_FIELDS if name in kwargs}
        return {**config_dict, **overrides}, kwargs  # overrides replace the file's values before they are checked

    def to_dict(self) -> dict:
        out = super().to_dict()
        for flag in ("_sparsity_ready", "_structure_fixed"):  # internal: which assignments are checked
            out.pop(flag, None)
        return out

    def sparsity_dict(self) -> dict:
        """The sparsity settings alone, as saved in `config.json`."""
        return {name: getattr(self, name) for name in SPARSITY_FIELDS}



@strict
class DynamicLlavaConfig(SparsitySettings, LlavaConfig):
    """LLaVA (llava-hf) configuration with the Dynamic-LLaVA sparsity settings (`SparsitySettings`)."""

    model_type = "dynamic_llava"
    base_model_types: ClassVar[tuple[str, ...]] = (LlavaConfig.model_type,)
    family: ClassVar[str] = "LLaVA"


__all__ = ["DynamicLlavaConfig", "SparsitySettings", "SPARSITY_FIELDS", "STRUCTURE_FIELDS"]
