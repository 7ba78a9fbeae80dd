"""longtake: long AI video from overlapping windows co-denoised in parallel on Ray workers.

    import longtake
    result = longtake.render({"prompt": "a red ball", "seconds": 10, "out": "ball.mp4"})

The package's face imports nothing heavy: `render`, `RenderRequest` and `RequestError` are loaded when first
used (the request with pydantic; a render with torch, and Ray when it runs on workers).
"""

from longtake.version import __version__

__all__ = ["RenderRequest", "RequestError", "render", "__version__"]


def render(request, **kwargs):
    """Render a request (a RenderRequest or a dict of its fields); see cluster.runtime.render."""
    from longtake.cluster.runtime import render as _render

    return _render(request, **kwargs)


def __getattr__(name: str):
    if name in ("RenderRequest", "RequestError"):
        from longtake import request

        return getattr(request, name)
    raise AttributeError(f"module 'longtake' has no attribute {name!r}")
