"""Bricks: functional units of a model (FFN neurons and groups of them), after "Configurable Foundation Models".

- :mod:`sparkformer.bricks.neurons`: a uniform per-layer view of FFN neurons (HF gated/plain FFNs and our SparkLM)
  with hooks that record or zero their activations.
- :mod:`sparkformer.bricks.capabilities`: capability-labelled prompt sets from installable real text.
- :mod:`sparkformer.bricks.analysis`: the paper's three neuron studies (sparsity, specialisation, partition).
- :mod:`sparkformer.bricks.report`: JSON + PNG + Markdown output; ``sparkformer bricks analyze`` in
  :mod:`sparkformer.bricks.cli`.
"""

from sparkformer.bricks.neurons import SUPPORTED_ARCHITECTURES, FFNNeurons, NeuronView, find_ffn_layers

__all__ = ["NeuronView", "FFNNeurons", "find_ffn_layers", "SUPPORTED_ARCHITECTURES"]
