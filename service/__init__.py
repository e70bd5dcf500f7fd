"""The HTTP inspection service (`diffad serve`): FastAPI app, dynamic batching, backends, metrics.

settings.py  settings from DIFFAD_* variables and a settings file (pydantic-settings)
app.py       create_app(settings) and its lifespan; body-size limit, access log and request counting
routes.py    /inspect, /models, /healthz, /readyz, /metrics and the web page (static/index.html)
models.py    the bundles served: each with its backend, thread, queue and batcher; warm-up, readiness
batcher.py   dynamic batching per model (max batch size, max queue delay, bounded queue, deadlines)
backends.py  ONNX Runtime, TensorRT engines and PyTorch behind one interface; backend=auto
images.py    uploads to model input (Pillow), anomaly maps to PNG
server.py    uvicorn with a drain on SIGTERM

Nothing is imported here, and nothing on the serving path imports torch.
"""
