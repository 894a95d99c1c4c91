"""A first end-to-end run of the seed flow."""

from tests.support import Env, eventually


async def test_seed_flow_smoke(env: Env) -> None:
    """A device informs, gets a notice for new firmware, downloads it, reports progress and the new version."""
    d = await env.device("pk", "dev1").connect()
    await d.inform("1.0.0")
    await eventually(lambda: env.find("/devices/pk/dev1"), what="the device to be registered")
    fw = await env.upload(b"firmware-bytes" * 1000)
    job = await env.job(fw["id"], ["pk/dev1"])
    [notice] = await d.notices()
    status, headers, body = await env.download(notice["data"]["url"])
    assert status == 200 and body == b"firmware-bytes" * 1000
    await d.progress("50", "downloading")
    await env.task_state(job["id"], "pk/dev1", "in_progress")
    await d.inform("2.0.0")
    await env.task_state(job["id"], "pk/dev1", "succeeded")
