"""The learning task both apps share: data sources, partitioning, models, the one local-training loop, node data.

Imports ``fl_compams`` only (plus torch, torchvision, scikit-learn, flwr-datasets); ``clients``, ``strategies`` and
``simulations`` build on it (design.md section 1).
"""
