"""Bricks: functional units of a model (FFN neurons and groups of them), after "Configurable Foundation Models".

Shared ground: :mod:`~sparkformer.bricks.adapter` (what differs between our SparkLM and an HF model),
:mod:`~sparkformer.bricks.tokens` (tokenizing, padded batches), :mod:`~sparkformer.bricks.lm` (losses, a trainer),
:mod:`~sparkformer.bricks.neurons` (a uniform per-layer view of FFN neurons with hooks that record or zero their
activations), :mod:`~sparkformer.bricks.capabilities` (capability-labelled prompts from installable real text) and
:mod:`~sparkformer.bricks.experiment` (settings dataclasses, command lines, the results writer).

Each command of ``sparkformer bricks`` is an experiment of the module that owns its concept, with a settings
dataclass and a ``run_<command>`` function that is its Python API:

    analyze    analysis.AnalyzeRun        neuron sparsity, specialisation, partition (report: report.py)
    partition  partition.PartitionRun     MoEfication: equal bricks per FFN layer
    route      brick_routers.RouteRun     learned brick routers vs oracle and random
    sparkify   sparkify.SparkifyRun       low-rank neuron predictors + statistical top-k for a gated FFN
    lora       lora.LoraRun               one LoRA brick per capability
    retrieve   retrieval.RetrieveRun      pick bricks per input by embedding similarity
    merge      merge.MergeRun             linear / task arithmetic / TIES / DARE merges of bricks
    edit       edit.EditRun               ROME rank-one edits vs fine-tuning (facts.py, tracing.py)
    grow       grow_train.GrowRun         width / depth / upcycling growth, trained on a new capability (grow.py)

Routers (:mod:`~sparkformer.bricks.routing`) are fitted on recorded FFN inputs (:mod:`~sparkformer.bricks.ffn_inputs`),
measured by :mod:`~sparkformer.bricks.router_eval` and recovered by :mod:`~sparkformer.bricks.continued_training`.
"""

from sparkformer.bricks.neurons import SUPPORTED_ARCHITECTURES, FFNNeurons, NeuronView, find_ffn_layers

__all__ = ["NeuronView", "FFNNeurons", "find_ffn_layers", "SUPPORTED_ARCHITECTURES"]
