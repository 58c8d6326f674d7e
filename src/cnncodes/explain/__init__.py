"""Why a model decides: class activation maps, Grad-CAM, occlusion, their faithfulness, and filter pictures.

`from cnncodes.explain import explain` is the library side of `cnncodes explain`; the name
loads its module on first use (PEP 562), so importing one part of the package loads no other.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "explain":
        from cnncodes.explain.run import explain

        return explain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
