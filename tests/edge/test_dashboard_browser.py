"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Over the real processes of `tests.support.stack`: `cibroker serve`, `worker` and `watcher` with
Redis, the fake Kubernetes API and the fake GitLab. A person opens the page, a push shows
up by itself, filters narrow it down (with JavaScript off: plain GET forms), and a re-run
from the run page with the API token makes a new PipelineRun; a wrong token makes nothing.

The browser is the OS package, never a Playwright download (the network is closed): when
it is missing this module errors with what to install instead of skipping.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from broker.core import pipelinerun as pr
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import RolloutSimulator
from tests.support.fakes.tekton import TektonSimulator
from tests.support.fakes.githost_api import FakeGitLab
from tests.support.stack import API_TOKEN, SHA1, STATUS, Stack

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers and root), and nothing that reaches for the network on its own.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SECONDS = 1000  # Playwright counts milliseconds
expect.set_options(timeout=15 * SECONDS)  # a shared 2-core machine can be slow to paint; a real failure still fails


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, kube: FakeKubeAPI, fake_gitlab_api: FakeGitLab) -> Iterator[Stack]:
    """tests.support.stack's stack with a signing key for every process (a cancel is a signed request)."""
    s = Stack(tmp_path, redis_url, kube, fake_gitlab_api,  # the origin: a real repository (file://)
              CIBROKER_SIGNING_KEY="browser-test-signing-key-with-more-than-32-chars")
    s.start_all()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"the dashboard's browser test needs Debian's chromium at {CHROMIUM}: `apt-get install chromium` "
                    "(scripts/bootstrap.sh --test does it); it is never downloaded by Playwright")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    yield context.new_page()
    context.close()


def built(stack: Stack, key: str) -> str:
    """Push to main and wait until the run succeeded and staging was deployed; the delivery id."""
    delivery_id = stack.push(key)
    stack.wait("deploy/staging success", lambda: stack.gitlab.states(SHA1, "deploy/staging")[-1:] == ["success"])
    return delivery_id


def api(stack: Stack, path: str) -> list[dict]:
    return httpx.get(f"{stack.url}{path}", headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10).json()


def test_a_push_appears_by_itself_and_the_filters_work_without_javascript(stack: Stack, kube: FakeKubeAPI, page: Page,
                                                                         browser: Browser) -> None:
    page.goto(f"{stack.url}/")
    expect(page.locator("#deliveries")).to_contain_text("No deliveries yet")
    with TektonSimulator(kube, auto_start=0.3, auto_finish=1.0), RolloutSimulator(kube):
        delivery_id = built(stack, "one")
    ignored = stack.push("other", repo="acme/other", project_id=43, expect=200)  # no route takes acme/other

    # No reload: the live refresh brings both in, the push with its run's outcome.
    row = page.locator(f'#deliveries tr[data-delivery="{delivery_id}"]')
    expect(row).to_contain_text("success")
    expect(row).to_contain_text("acme/shop-api")
    expect(row).to_contain_text("main")
    expect(row).to_contain_text(SHA1[:8])
    expect(row).to_contain_text("shop-api")
    expect(page.locator(f'#deliveries tr[data-delivery="{ignored}"]')).to_contain_text("ignored")
    [run] = stack.runs()
    expect(page.locator(f'#runs tr[data-run="ci/{run["metadata"]["name"]}"]')).to_contain_text("success")
    expect(page.locator("#live-status")).to_have_text("live")

    plain = browser.new_context(java_script_enabled=False).new_page()
    plain.goto(f"{stack.url}/")
    plain.fill("input[name=repo]", "acme/shop-api")
    plain.click("form.filters button")
    expect(plain).to_have_url(re.compile(r"\?repo=acme%2Fshop-api&state=$"))
    expect(plain.locator("#deliveries tr[data-delivery]")).to_have_count(1)
    expect(plain.locator(f'tr[data-delivery="{delivery_id}"]')).to_be_visible()
    plain.fill("input[name=repo]", "")
    plain.select_option("select[name=state]", "ignored")
    plain.click("form.filters button")
    expect(plain.locator("#deliveries tr[data-delivery]")).to_have_count(1)
    expect(plain.locator(f'tr[data-delivery="{ignored}"]')).to_be_visible()
    expect(plain.locator("#runs tr[data-run]")).to_have_count(0)
    plain.select_option("select[name=state]", "success")
    plain.click("form.filters button")
    expect(plain.locator(f'#deliveries tr[data-delivery="{delivery_id}"]')).to_be_visible()
    expect(plain.locator("#runs tr[data-run]")).to_have_count(1)
    plain.context.close()


def test_rerun_from_the_run_page_with_the_token_makes_attempt_2_and_a_wrong_token_makes_nothing(
        stack: Stack, kube: FakeKubeAPI, page: Page, tmp_path: Path) -> None:
    with TektonSimulator(kube, auto_start=0.3, auto_finish=1.0), RolloutSimulator(kube):
        first = built(stack, "one")
        [run] = stack.runs()
        name = run["metadata"]["name"]
        page.goto(f"{stack.url}/deliveries/{first}")
        page.click(f'#runs a[href="/runs/ci/{name}"]')
        expect(page).to_have_title(f"cibroker · success · {name}")
        statuses = page.locator("#statuses tbody tr")
        expect(statuses.filter(has_text="cibroker/build-test-push")).to_have_count(3)
        for state in ("pending", "running", "success"):
            expect(statuses.filter(has_text=f"cibroker/build-test-push {state} on {SHA1[:8]}: posted")).to_have_count(1)
        expect(page.locator("#taskruns")).to_contain_text("clone")
        expect(page.locator("#taskruns")).to_contain_text("build")
        expect(page.locator("#deploys")).to_contain_text("deploy_succeeded")
        expect(page.locator("#logs")).to_contain_text(f"tkn pipelinerun logs {name} -n ci")

        rerun = page.locator('form[action$="/rerun"]')
        rerun.locator("input[name=token]").fill("not-the-token")
        rerun.locator("input[name=reason]").fill("flaky test")
        with page.expect_navigation() as refused:
            rerun.locator("button").click()
        assert refused.value is not None and refused.value.status == 403
        expect(page.locator(".flash.error")).to_contain_text("invalid API token")
        assert len(stack.runs()) == 1 and api(stack, "/api/audit") == [] and len(api(stack, "/api/deliveries")) == 1

        rerun = page.locator('form[action$="/rerun"]')
        expect(rerun.locator("input[name=reason]")).to_have_value("flaky test")  # kept; the token field is empty again
        expect(rerun.locator("input[name=token]")).to_have_value("")
        rerun.locator("input[name=token]").fill(API_TOKEN)
        rerun.locator("button").click()
        expect(page).to_have_url(re.compile(r"/deliveries/[0-9a-f]{26}$"))
        second = page.url.rsplit("/", 1)[1]
        assert second != first
        # The worker makes the run after the page was served: the live refresh shows it.
        new_run = page.locator("#runs tr[data-run]")
        expect(new_run).to_have_count(1, timeout=30 * SECONDS)
        [made] = [r for r in stack.runs() if r["metadata"]["labels"][pr.L_DELIVERY] == second]
        assert made["metadata"]["annotations"][pr.A_ATTEMPT] == "2"
        assert made["metadata"]["labels"][pr.L_SHA] == SHA1 and made["metadata"]["name"] != name
        expect(new_run).to_have_attribute("data-run", f"ci/{made['metadata']['name']}")
        expect(page.locator("#log")).to_contain_text("re-run of PipelineRun ci/" + name)
        [audit] = api(stack, "/api/audit")
        assert (audit["who"], audit["channel"], audit["reason"]) == ("token1", "dashboard", "flaky test")

        new_run.locator("a").click()
        expect(page.locator("h1")).to_contain_text(made["metadata"]["name"])
        expect(page.locator("#attempts tr[data-run]")).to_have_count(2)
        stack.wait("the re-run deployed", lambda: stack.gitlab.states(SHA1, "deploy/staging").count("success") == 2)

    page.goto(f"{stack.url}/")
    expect(page.locator("#runs tr[data-run]")).to_have_count(2)
    # The README's picture (docs/dashboard.png is a copy of one taken here).
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)


def test_cancel_from_the_run_page_says_it_was_requested_and_is_audited(stack: Stack, kube: FakeKubeAPI, page: Page) -> None:
    """The page words a cancel as what it is: a request queued for a worker, not a run already stopped."""
    with TektonSimulator(kube, auto_start=0.2, auto_finish=300):
        stack.push("c")
        stack.wait("running", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["running"])
        [run] = stack.runs()
        name = run["metadata"]["name"]
        page.goto(f"{stack.url}/runs/ci/{name}")
        cancel = page.locator('form[action$="/cancel"]')
        expect(cancel).to_contain_text("Asks a worker to stop the run")
        cancel.locator("input[name=token]").fill(API_TOKEN)
        cancel.locator("input[name=reason]").fill("wrong branch")
        cancel.locator("button").click()
        expect(page).to_have_url(re.compile(rf"/runs/ci/{name}\?did=cancel$"))
        expect(page.locator(".flash")).to_contain_text("Cancel requested: queued for a worker")
        [audit] = api(stack, "/api/audit")
        assert (audit["action"], audit["channel"], audit["reason"]) == ("cancel", "dashboard", "wrong branch")
        assert audit["result"].startswith("requested (Cancelled), request ")
