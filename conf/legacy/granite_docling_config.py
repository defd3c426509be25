"""Full fine-tuning of granite-docling on DoclingMatix + SynthFormulaNet (the seed's config file).

    python train.py --config conf/legacy/granite_docling_config.py [--resume CHECKPOINT]

Older ``get_config()`` files like this one are still accepted; they map onto the same schema as the
Hydra configs (``conf/config.yaml``), which are the recommended way to compose experiments now.
"""


def get_config():
    return {
        "model": {
            # A hub id or a local snapshot folder.
            "checkpoint": "ibm-granite/granite-docling-258M",
        },
        "datasets": [
            {
                "name": "DoclingMatix",
                "path": "../DoclingMatix_00000",
                "max_turns": None,  # all question/answer turns
                "max_samples": None,  # all samples
                "max_images_per_sample": None,  # all pages: conversion needs the whole document
            },
            {
                "name": "SynthFormulaNet",
                "path": "../SynthFormulaNet_00000",
                "max_turns": None,
                "max_samples": None,
                "max_images_per_sample": None,
            },
        ],
        "training": {
            "num_epochs": 3,
            "batch_size": 1,  # per device
            "gradient_accumulation_steps": 8,  # effective batch = 1 x 8 x number of GPUs
            "val_ratio": 0.05,
            "lr_vision": 5e-5,
            "lr_text": 5e-5,
            "lr_connector": 5e-4,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "min_lr": 1e-6,
            "gradient_checkpointing": True,
            "num_workers": 8,
            "log_interval": 10,  # optimizer steps
            "val_interval": 1,  # epochs
            "save_interval": 1,  # epochs
            "save_dir": "./checkpoints/granite_docling_finetuned",
        },
        "wandb": {
            "enabled": False,
            "project": "granite-docling-finetuning",
            "run_name": "docling_formula_combined",
        },
    }
