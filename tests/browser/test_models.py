"""The form's model menu in a browser: choosing a model brings its defaults and sizes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import Farm

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def expect(target: Any) -> Any:
    """Playwright's ``expect``, imported only once the browser fixtures found Playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def test_choosing_a_model_brings_its_defaults_and_sizes(page: Any, farm: Farm) -> None:
    page.goto(f"{farm.url}/")
    expect(page.locator("#model")).to_have_value("tiny")
    expect(page.locator("#num_frames")).to_have_value("8")
    page.fill("#num_inference_steps", "3")  # typed by hand: it stays
    page.select_option("#model", "svd-xt")
    expect(page.locator("#num_frames")).to_have_value("25")
    expect(page.locator("#num_inference_steps")).to_have_value("3")
    expect(page.locator("#model-defaults")).to_have_text("svd-xt")
    page.select_option("#size-preset", "1024x576")
    expect(page.locator("#width")).to_have_value("1024")
    expect(page.locator("#height")).to_have_value("576")
    page.select_option("#model", "tiny")
    expect(page.locator("#num_frames")).to_have_value("8")
    expect(page.locator("#size-preset option[value='64x64']")).to_have_count(1)
    expect(page.locator("#size-preset option[value='1024x576']")).to_have_count(0)
