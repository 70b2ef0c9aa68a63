"""Model files: the format table (formats), and one module per format holding both its exporter and
its runtime (pytorch, torchscript, onnx, openvino, tensorrt, hub); what the runtimes share (runtime);
what an exporter is handed (context); the deploy form of a network (deploy_form); the export of a
checkpoint (export) and the parity check of every file it writes (parity).

Adding a format is one row in formats.FORMATS and one module with `export(ctx)` and `Backend`.
This package stands below utils.infer, which runs any of these files through the table.
"""
