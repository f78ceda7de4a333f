"""The form's several images in a real browser: chosen, dropped and pasted images show as
previews, and submitting them makes a batch whose page follows every job to its outputs."""

from __future__ import annotations

import re
import time
from typing import Any

from tests.browser.conftest import Farm
from tests.factories import jpeg_bytes, png_bytes

BATCH_URL = re.compile(r".*/batches/([0-9a-f-]{36})$")

#: Drops a generated PNG on the form's image field, as a file dragged from the desktop.
DROP = """async () => {
    const canvas = document.createElement('canvas');
    canvas.width = 80; canvas.height = 48;
    canvas.getContext('2d').fillRect(0, 0, 40, 48);
    const blob = await new Promise(done => canvas.toBlob(done, 'image/png'));
    const data = new DataTransfer();
    data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
    const zone = document.getElementById('dropzone');
    zone.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
}"""


def previews(page: Any) -> list[str]:
    """The file names under the previews, once each preview image has loaded."""
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#previews img'))"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    names: list[str] = page.eval_on_selector_all(
        "#previews figcaption", "nodes => nodes.map(n => n.textContent)"
    )
    return names


def test_several_images_preview_and_render_as_a_batch(
    page: Any, farm: Farm, screenshots: Any
) -> None:
    """Two images chosen and one dropped show three previews; submitted with small settings
    they make a batch of three jobs, whose page shows them all done with their outputs."""
    page.goto(f"{farm.url}/")
    assert page.is_hidden("#previews")
    page.set_input_files(
        "#image",
        files=[
            {"name": "wide.png", "mimeType": "image/png", "buffer": png_bytes(96, 64)},
            {"name": "tall.jpg", "mimeType": "image/jpeg", "buffer": jpeg_bytes(64, 96)},
        ],
    )
    assert previews(page) == ["wide.png", "tall.jpg"]
    page.evaluate(DROP)
    assert previews(page) == ["wide.png", "tall.jpg", "dropped.png"]
    for name, value in (("num_frames", "2"), ("num_inference_steps", "1"), ("seed", "4")):
        page.fill(f"#{name}", value)
    page.check("#output-gif")
    page.click("#advanced summary")
    page.fill("#max_guidance_scale", "2")
    page.screenshot(path=str(screenshots / "form-batch.png"), full_page=True)
    page.click("button[type=submit]")
    page.wait_for_url(BATCH_URL)
    rows = page.locator("#batch-jobs tbody tr")
    assert rows.count() == 3
    batch_id = BATCH_URL.match(page.url)
    assert batch_id
    deadline = time.monotonic() + 300
    while not page.request.get(f"{farm.url}/api/v1/batches/{batch_id[1]}").json()["done"]:
        assert time.monotonic() < deadline, farm.log()[-3000:]
        time.sleep(1)
    page.goto(page.url)
    assert page.locator("#batch-jobs tbody tr.state-succeeded").count() == 3
    assert page.locator("#batch-jobs a", has_text="gif").count() == 3
    assert page.is_visible("#download-batch")
    page.screenshot(path=str(screenshots / "batch.png"), full_page=True)
