"""Fine-tune IBM's granite-docling-258M document VLM on your own documents.

Entry points are ``train.py`` and ``evaluate.py`` (Hydra) and the ``granite-docling`` console script.
"""

__version__ = "0.1.0"
