"""Quick test of the whole pipeline on 100 samples per dataset, 1 epoch (the seed's test config file).

    python train.py --config conf/legacy/granite_docling_test.py

Run this before a full run to check that data, model and checkpoints work.
"""


def get_config():
    return {
        "model": {
            "checkpoint": "ibm-granite/granite-docling-258M",
        },
        "datasets": [
            {
                "name": "DoclingMatix_test",
                "path": "../DoclingMatix_00000",
                "max_turns": 3,
                "max_samples": 100,
                "max_images_per_sample": None,  # all pages: conversion needs the whole document
            },
            {
                "name": "SynthFormulaNet_test",
                "path": "../SynthFormulaNet_00000",
                "max_turns": None,
                "max_samples": 100,
                "max_images_per_sample": None,
            },
        ],
        "training": {
            "num_epochs": 1,
            "batch_size": 1,
            "gradient_accumulation_steps": 4,  # effective batch = 1 x 4 x number of GPUs
            "val_ratio": 0.1,
            "lr_vision": 5e-5,
            "lr_text": 5e-5,
            "lr_connector": 5e-4,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "min_lr": 1e-6,
            "gradient_checkpointing": True,
            "num_workers": 2,
            "log_interval": 5,
            "val_interval": 1,
            "save_interval": 1,
            "save_dir": "./checkpoints/granite_docling_test",
        },
        "wandb": {
            "enabled": False,
            "project": "granite-docling-test",
            "run_name": "quick_test",
        },
    }
