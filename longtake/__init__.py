"""longtake: long AI video from overlapping windows co-denoised in parallel on Ray workers.

    import longtake
    result = longtake.render({"prompt": "a red ball", "seconds": 10, "out": "ball.mp4"})
"""

from longtake.request import RenderRequest, RequestError
from longtake.version import __version__

__all__ = ["RenderRequest", "RequestError", "render", "__version__"]


def render(request, **kwargs):
    """Render a request (a RenderRequest or a dict of its fields); see cluster.runtime.render."""
    from longtake.cluster.runtime import render as _render

    return _render(request, **kwargs)
