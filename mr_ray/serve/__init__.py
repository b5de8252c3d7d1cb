"""Online search over HTTP with Ray Serve (see mr_ray.serve.app)."""
