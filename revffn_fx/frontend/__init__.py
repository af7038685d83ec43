"""The front end: load a local model directory, trace it with torch.fx (the IR), and the
analysis result (Plan) the passes read; per-architecture facts live in registry.py."""
