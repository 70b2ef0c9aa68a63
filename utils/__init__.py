"""The toolkit's library, in packages by concern. From the bottom up (a package imports only the
ones before it; tests/test_structure.py checks it):

    core      logging, options, config, names, the task types, the checkpoint schema, files, device, processes, run folders
    draw      figures and images with text
    data      finding, decoding and transforming images; datasets, loaders, augmentation, caches
    models    model names to networks, weights into models, features
    deploy    the model formats: one table, one module per format (exporter and runtime), the export and its parity
    infer     running any model file: backends, ensembles, images to predict, prediction rows, speed
    evaluate  scoring a labelled split: metrics, reports, classical classifiers on features
    explain   Grad-CAM and feature maps
    train     the trainer, its set-up, epoch loop, losses, optimizers, schedules, state, saver, log
    serve     serve.py's service, HTTP app, Redis queue and web page

docs/architecture.md lists every module and shows the data flow.
"""

__version__ = "1.1.0"  # the one version string: every script's --version, exported files' metadata
