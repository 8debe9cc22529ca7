"""The pipeline's units of work, one room per concern (see the README's layout table):

    core/      errors, params, storage, image I/O, tracking, paths, devices, component files
    data/      sources, manifest, synthesis, shard reading, the preview sheet
    train/     the training loop and Phases I, II, III
    evaluate/  metrics, sets, modes, tables, plots, the stage
    registry/  MLflow registry: store, register, the gate, add-degradation
    serve/     inference, `abair restore`, the MLflow pyfunc

Importing this package has no side effects.
"""
