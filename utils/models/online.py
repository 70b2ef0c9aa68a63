"""Whether pretrained weights can be downloaded now: one short request through huggingface_hub's own
HTTP client, so the answer is the one a download would get.

    if weights_server_online():              # the Hub (HF_ENDPOINT, a mirror where it is set)
    if weights_server_online(TORCHVISION_WEIGHTS):

huggingface_hub's client (`huggingface_hub.utils.get_session()`: requests before 1.0, httpx after)
honours HF_ENDPOINT, HF_HUB_OFFLINE and the proxy variables (HTTPS_PROXY, HTTP_PROXY, NO_PROXY),
which a raw TCP connection to huggingface.co did not: behind a proxy or with a mirror, that said
"offline" on a machine that could download. One request with a short timeout and no retries answers
in at most PROBE_TIMEOUT seconds with no network, where timm's own download retries for about 45 s.
"""
from __future__ import annotations

import logging
import os

LOGGER = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds: a reachable server answers a HEAD within this even through a proxy
TORCHVISION_WEIGHTS = "https://download.pytorch.org/models/"  # where torchvision's ImageNet weights are


def _hub_offline_mode() -> bool:
    """HF_HUB_OFFLINE=1 (as huggingface_hub reads it, or set in this process since): use the caches,
    never the network; the toolkit applies it to torchvision's weights as well."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "true", "yes"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def weights_server_online(url: str | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a weights server answers: one HEAD request through huggingface_hub's HTTP client.

    Args:
        url: the server; None is the Hub endpoint huggingface_hub downloads from (HF_ENDPOINT, else
            https://huggingface.co).
        timeout: seconds to wait for the connection and the answer.

    Returns:
        True when the server answered at all (any HTTP status: a 404 or 401 still means the network
        is there); False in offline mode, or when the connection, the proxy or the name lookup failed.
    """
    if _hub_offline_mode():
        return False
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:
        return False
    target = url or constants.ENDPOINT.rstrip("/") + "/"
    try:
        get_session().head(target, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - requests, httpx and huggingface_hub raise different types for "no answer"
        LOGGER.info("%s did not answer within %.0f s (%s: %s): offline", target, timeout, type(err).__name__, err)
        return False
    return True
