"""Export: a trained run to a model bundle that serves without PyTorch.

onnx_export.py      the whole one-step pipeline as one ONNX graph (torch)
parity.py           ONNX Runtime against PyTorch, TensorRT against ONNX Runtime
bundle.py           bundle.json: write, load, verify hashes, normalise scores (no torch)
tensorrt_engine.py  TensorRT engines per GPU and TensorRT version (tensorrt imported lazily, no torch)
exporter.py         `diffad export`: all of the above in a staging folder, moved into place once checked

Nothing is imported here, so `import diffad.export.bundle` stays light on the serving path.
"""
