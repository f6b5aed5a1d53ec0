"""``sparkformer sparsify``: a pretrained dense model in, an activation-sparse model out (thresholds and/or FFN
routers), with its held-out quality measured and its decode run by the CPU engine.

    data.py       calibration / held-out token windows per domain (real text, no hub)
    calibrate.py  training-free thresholds: activation magnitudes -> KL-greedy per-site levels -> SparseSpec
    methods.py    teal, cats, predictor (+ verify stage), oracle (reference)
    evaluate.py   held-out perplexity per domain with a spec / routers applied, achieved sparsity
    command.py    ``run_sparsify(SparsifySettings)`` and the CLI; the output folder format
"""
