"""Each notebook step's glue to its run folder, one module per step that has any: ``finetune`` (02: continue or
set aside a saved training, the step in many processes, the temperature recorded), ``evaluate`` (03: the external
query, the temperature to predict with), ``zeroshot`` (04: reference, query and label maps)."""

from ...core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "FinetuneInputs": "finetune",
    "finetune_inputs": "finetune",
    "train_model": "finetune",
    "begin_training": "finetune",
    "run_finetune_step": "finetune",
    "launch_finetune": "finetune",
    "torchrun_command": "finetune",
    "save_temperature": "finetune",
    "DistributedRunError": "finetune",
    "read_query": "evaluate",
    "model_temperature": "evaluate",
    "FROM_MANIFEST": "evaluate",
    "FITTED_HERE": "evaluate",
    "zeroshot_inputs": "zeroshot",
    "ZeroshotLabelMaps": "zeroshot",
    "training_overlap": "zeroshot",
})
