"""The Hugging Face hub, offline unless reachable: one TCP connect decides, so a machine without network gets its
error in seconds (files already in the hub cache are still used), not after a minute of retried requests.

    with hub_offline_unless_reachable():
        clip = open_clip.create_model("ViT-L-14-quickgelu", pretrained="openai")
"""
import contextlib
import socket
import urllib.parse
import urllib.request


@contextlib.contextmanager
def hub_offline_unless_reachable(timeout=3.0):
    """Hugging Face hub downloads in offline mode (the hub library's own HF_HUB_OFFLINE switch) when one TCP connect
    to the hub (or to the HTTPS proxy, if one is set) fails within `timeout` seconds: files already in the hub cache
    are still used, and a machine without network gets its error in seconds, not after a minute of retried requests."""
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    if not before:
        hub = urllib.parse.urlparse(constants.ENDPOINT)
        proxy = urllib.request.getproxies().get("https")
        address = (hub.hostname, hub.port or 443)
        if proxy and not urllib.request.proxy_bypass(hub.hostname):
            proxy = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
            address = (proxy.hostname, proxy.port or 80)
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
