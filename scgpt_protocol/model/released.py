"""The released scGPT checkpoint layout, which reading (:mod:`~scgpt_protocol.model.checkpoint`) and writing
(:mod:`~scgpt_protocol.model.save`) share: its files, the ``args.json`` keys of the architecture, and which
weight prefixes must, may or need not be there."""

from __future__ import annotations

__all__ = ["CHECKPOINT_FILES", "ARCH_KEYS", "PRETRAINING_ONLY_PREFIXES", "REQUIRED_PREFIXES", "OPTIONAL_PREFIXES"]

#: the files of a checkpoint folder
CHECKPOINT_FILES = ("args.json", "vocab.json", "best_model.pt")
#: keys of the released checkpoint that only pretraining used
PRETRAINING_ONLY_PREFIXES = ("flag_encoder.",)
#: parts of the model that must come from the checkpoint (a random one would be silently wrong)
REQUIRED_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")
#: parts that only the pretraining objectives use; missing ones are reported, not fatal
OPTIONAL_PREFIXES = ("decoder.", "mvc_decoder.")
#: args.json keys that define the architecture: args name -> ScGPTConfig name
ARCH_KEYS = {
    "embsize": "d_model",
    "nheads": "nheads",
    "d_hid": "d_hid",
    "nlayers": "nlayers",
    "n_layers_cls": "n_layers_cls",
    "dropout": "dropout",
    "n_bins": "n_bins",
    "pad_token": "pad_token",
    "pad_value": "pad_value",
    "mask_value": "mask_value",
    "max_seq_len": "max_seq_len",
    "input_emb_style": "input_emb_style",
}
