"""The demo page (`streamlit run frontend.py`) against real servers: driven by streamlit's AppTest, and in a
real browser (Playwright with Debian's chromium), which also checks that no server outlives streamlit.

`UPDATE_ASSETS=1 pytest tests/test_frontend.py` also copies the browser's screenshot to assets/demo.png.
"""

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
import yaml
from conftest import API_KEY, mlp, mouse_observation, save_model
from experience_support import logging_policy, read_table
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright
from servers import REPO, Server, clean_env, free_port, running_server, uvicorn_command
from streamlit.testing.v1 import AppTest
from test_repository import KEYS, make_policy

from policy_server.demo import launcher

APP = REPO / "frontend.py"
EXAMPLES = REPO / "examples"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BROWSER_TIMEOUT_MS = 30_000
START_TIMEOUT_MS = 90_000  # the server started from the page loads its policy
GONE_TIMEOUT_S = 20.0
MOUSE_LABELS = ["up", "down", "left", "right"]
MASK_LABELS = ["machine: a", "machine: b", "speed: slow", "speed: normal", "speed: fast"]
# The server's stack, which the page (a client of its HTTP API) never needs, and altair, for the first chart only.
NOT_AT_FIRST_RENDER = ("torch", "ray", "fastapi", "numpy", "altair")
FIRST_RENDER = """
import json, sys
from streamlit.testing.v1 import AppTest

app, url, *heavy = sys.argv[1:]
at = AppTest.from_file(app, default_timeout=60)
at.session_state["url"] = url
at.run()
assert not at.exception, [exception.value for exception in at.exception]
imported = {"heavy": [name for name in heavy if name in sys.modules], "ours": sorted(n for n in sys.modules if n.startswith("policy_server"))}
print(json.dumps(imported))
"""

# --- servers and pages ----------------------------------------------------------------------


def serving(folder: Path, **env: str) -> AbstractContextManager[Server]:
    """A real `uvicorn app:app` serving `folder` (a policy, or a repository of them) on a free port."""
    port = free_port()
    return running_server(uvicorn_command(port), port, cwd=REPO, env={"POLICY_SERVER_DIR": str(folder)} | env)


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, Server]]:
    """The three examples served for the whole module, started side by side (each takes seconds to load)."""
    names = ("mouse_and_cheese", "tuple_masking", "pendulum")
    with ExitStack() as stack, ThreadPoolExecutor(len(names)) as pool:
        yield dict(zip(names, pool.map(stack.enter_context, [serving(EXAMPLES / name) for name in names]), strict=True))


def page(url: str, api_key: str = API_KEY) -> AppTest:
    """The page after its first run with this URL and key typed in the sidebar."""
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["url"] = url
    at.session_state["api_key"] = api_key
    return run(at)


def run(at: AppTest, timeout: float | None = None) -> AppTest:
    """Run the script; whatever the server answered, the page never shows a Python exception."""
    at.run(timeout=timeout)
    assert not at.exception, [exception.value for exception in at.exception]
    return at


def click(at: AppTest, key: str, timeout: float | None = None) -> AppTest:
    at.button(key=key).click()
    return run(at, timeout)


def metrics(at: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in at.metric}


def charts(at: AppTest) -> dict[str, list[dict[str, Any]]]:
    """Each chart's rows (label, probability, status, text), by its head's name."""
    found = {}
    for chart in at.get("vega_lite_chart"):
        head = json.loads(chart.proto.spec)["title"].split(":")[0]
        found[head] = pa.ipc.open_stream(chart.proto.data.data).read_all().to_pylist()
    return found


def texts(elements: Any) -> str:
    return "\n".join(str(element.value) for element in elements)


def set_mouse(at: AppTest, mouse: tuple[int, int], cheese: tuple[int, int]) -> None:
    for name, value in mouse_observation(mouse, cheese).items():
        at.number_input(key=f"obs:mouse_and_cheese:{name}").set_value(float(value))


# --- AppTest against real servers -------------------------------------------------------------


def test_status_and_form_come_from_info_and_schema(examples: dict[str, Server]) -> None:
    at = page(examples["mouse_and_cheese"].url)
    status = texts(at.sidebar.success)
    assert "mouse_and_cheese" in status and "model.pt2" in status and "backend local" in status and "device cpu" in status
    inputs = {field.label: field for field in at.number_input}
    assert list(inputs) == ["mouse_row", "mouse_col", "mouse_row_distance", "mouse_col_distance", "cheese_row", "cheese_col"]
    assert (inputs["mouse_row"].min, inputs["mouse_row"].max, inputs["mouse_row"].value) == (0, 5, 2.5)
    assert (inputs["mouse_row_distance"].min, inputs["mouse_row_distance"].max, inputs["mouse_row_distance"].value) == (-5, 5, 0)
    assert "Start the server from schema" not in [button.label for button in at.button]  # something answers
    assert [tab.label for tab in at.tabs] == ["Observation", "Raw observation"]


@pytest.mark.parametrize(
    ("mouse", "cheese", "action"),
    [((0, 0), (3, 2), "down"), ((3, 0), (3, 2), "right"), ((3, 4), (3, 2), "left"), ((4, 2), (3, 2), "up")],
)
def test_deterministic_action_follows_the_observation(
    examples: dict[str, Server], mouse: tuple[int, int], cheese: tuple[int, int], action: str
) -> None:
    at = page(examples["mouse_and_cheese"].url)
    set_mouse(at, mouse, cheese)
    click(at, "ask:predict_deterministic")
    assert metrics(at)["move"] == action
    rows = charts(at)["move"]
    assert [row["label"] for row in rows] == MOUSE_LABELS
    assert [row["status"] for row in rows] == ["chosen" if label == action else "allowed" for label in MOUSE_LABELS]
    chosen = rows[MOUSE_LABELS.index(action)]["probability"]
    assert chosen == max(row["probability"] for row in rows)
    assert float(metrics(at)["probability"]) == pytest.approx(chosen, rel=1e-3)


def test_each_button_shows_its_answer_and_the_history(examples: dict[str, Server]) -> None:
    at = page(examples["mouse_and_cheese"].url)
    set_mouse(at, (0, 0), (3, 2))
    click(at, "ask:predict")
    sampled = metrics(at)
    rows = {row["label"]: row for row in charts(at)["move"]}
    assert sum(row["probability"] for row in rows.values()) == pytest.approx(1.0)
    assert rows[sampled["move"]]["status"] == "chosen"
    assert float(sampled["probability"]) == pytest.approx(rows[sampled["move"]]["probability"], rel=1e-3)

    click(at, "ask:distribution")
    assert metrics(at) == {"move": "down"}  # the most likely action; a distribution has no sampled probability
    assert "most likely" in texts(at.caption)
    assert [row["status"] for row in charts(at)["move"]] == ["allowed", "chosen", "allowed", "allowed"]

    click(at, "ask:predict_deterministic")
    history = at.dataframe[0].value
    assert list(history["route"]) == ["predict_deterministic", "distribution", "predict"]  # newest first
    assert list(history["action"])[:2] == ["move: down", "move: down"]
    assert json.loads(history["observation"][0]) == mouse_observation((0, 0), (3, 2))
    assert [button.label for button in at.download_button] == ["Download CSV"]


def test_mask_checkboxes_mask_actions(examples: dict[str, Server]) -> None:
    at = page(examples["tuple_masking"].url)
    assert [(box.label, box.value) for box in at.checkbox] == [(label, True) for label in MASK_LABELS]
    assert [field.label for field in at.number_input][-2:] == ["queue_lengths[0]", "queue_lengths[1]"]  # a short list: one input each

    at.checkbox(key="obs:tuple_masking:actionMask[1]").uncheck()  # machine b not allowed
    click(at, "ask:predict")
    assert metrics(at)["machine"] == "a"
    machine = {row["label"]: row for row in charts(at)["machine"]}
    assert machine["b"] == {"label": "b", "probability": 0.0, "status": "masked (0)", "text": "masked"}
    assert machine["a"]["status"] == "chosen" and machine["a"]["probability"] == pytest.approx(1.0)
    assert [row["label"] for row in charts(at)["speed"]] == ["slow", "normal", "fast"]

    at.checkbox(key="obs:tuple_masking:actionMask[0]").uncheck()  # no machine allowed: the server's 422
    click(at, "ask:predict")
    assert texts(at.error) == "422: the action mask allows no action of head 'machine'"
    assert not at.metric and not charts(at)


def test_random_observation_stays_valid(examples: dict[str, Server]) -> None:
    at = page(examples["tuple_masking"].url)
    example_values = [field.value for field in at.number_input]
    for _ in range(3):
        click(at, "random")
        fields = at.number_input
        assert all(field.min <= field.value <= field.max for field in fields)
        mask = [box.value for box in at.checkbox]
        assert any(mask[:2]) and any(mask[2:])  # one action of each head allowed
        click(at, "ask:predict")
        assert not at.error and metrics(at)["machine"] in ("a", "b")
    assert [field.value for field in at.number_input] != example_values


def test_continuous_head_shows_mean_and_std(examples: dict[str, Server]) -> None:
    at = page(examples["pendulum"].url)
    click(at, "ask:predict")
    torque = float(metrics(at)["torque"])
    assert -2.0 <= torque <= 2.0
    assert "probability" not in metrics(at)  # continuous actions have none
    assert not charts(at)
    click(at, "ask:predict_deterministic")
    mean = metrics(at)["torque"]
    assert f"mean {mean} ± " in texts(at.caption)


@pytest.mark.parametrize(("api_key", "detail"), [("wrong", "403: Wrong api key"), ("", "401: Missing api key")])
def test_a_wrong_key_shows_the_servers_detail(examples: dict[str, Server], api_key: str, detail: str) -> None:
    at = page(examples["mouse_and_cheese"].url, api_key=api_key)
    assert detail in texts(at.sidebar.warning)
    assert not at.number_input  # no form without /schema, which needs the key too


@pytest.mark.parametrize(
    ("url", "message"),
    [("http://127.0.0.1:{port}", "Nothing answers at http://127.0.0.1:{port} (ConnectError"), ("127.0.0.1:{port}", "is not an http://")],
)
def test_unreachable_server_is_a_clear_message(url: str, message: str) -> None:
    port = free_port()
    at = page(url.format(port=port))
    assert message.format(port=port) in texts(at.sidebar.error)
    assert "No policy to ask yet" in texts(at.info)


def test_first_render_imports_nothing_heavy() -> None:
    """The page's first run, in a fresh interpreter: importing torch (through the server's model loading)
    made the page take seconds to first show."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing answers: the page's first render for a new user
    command = [sys.executable, "-c", FIRST_RENDER, str(APP), url, *NOT_AT_FIRST_RENDER]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.splitlines()[-1])
    assert imported["heavy"] == [], f"the page imported {imported['heavy']}; its modules: {imported['ours']}"


def test_raw_tab_for_a_schema_without_observations(tmp_path: Path) -> None:
    schema = yaml.safe_load((EXAMPLES / "mouse_and_cheese" / "schema.yaml").read_text())
    del schema["observations"]
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    shutil.copytree(EXAMPLES / "mouse_and_cheese" / "models", tmp_path / "models")
    with serving(tmp_path) as server:
        at = page(server.url)
        assert [tab.label for tab in at.tabs] == ["Raw observation"]
        assert at.text_area[0].value == ", ".join(["0.0"] * 6)
        at.text_area[0].set_value("0, 0, 3, 2, 3, 2")
        click(at, "ask:predict_raw")
        assert metrics(at)["move"] in MOUSE_LABELS and 0 < float(metrics(at)["probability"]) <= 1
        assert not charts(at)  # no /distribution for a raw row
        assert list(at.dataframe[0].value["route"]) == ["predict_raw"]

        at.text_area[0].set_value("0, 0, 3")
        run(at)
        assert "obs: 3 values, at least 6 needed" in texts(at.error)
        assert at.button(key="ask:predict_raw").disabled


def test_long_list_is_a_text_area_checked_before_sending(tmp_path: Path) -> None:
    schema = """\
parameters: {discrete: true, tuple: false, api_key: "1234567asdfgh"}
observations:
  readings: {type: "List[float]", min_items: 10, max_items: 10, minimum: -1, maximum: 1}
actions:
  - {name: move, n: 4, labels: [up, down, left, right]}
"""
    (tmp_path / "schema.yaml").write_text(schema)
    save_model(mlp(10, 4), tmp_path / "models" / "model.pt2", 10)
    with serving(tmp_path) as server:
        at = page(server.url)
        area = at.text_area(key=f"obs:{tmp_path.name}:readings")
        assert area.value == ", ".join(["0.0"] * 10)  # the middle of [-1, 1]
        area.set_value("0.5, 0, 0, 0, 0, 0, 0, 0, 2, x")
        run(at)
        assert texts(at.error) == "Not sent until fixed: readings[8]: 2.0 is above the maximum 1.0; readings[9]: 'x' is not a number"
        assert at.button(key="ask:predict").disabled
        at.text_area(key=f"obs:{tmp_path.name}:readings").set_value("[0.5 0 0 0 0 0 0 0 0 -1]")
        run(at)
        click(at, "ask:predict")
        assert metrics(at)["move"] in MOUSE_LABELS
        assert json.loads(at.dataframe[0].value["observation"][0]) == {"readings": [0.5, 0, 0, 0, 0, 0, 0, 0, 0, -1]}


# --- several policies at one URL ------------------------------------------------------------


def ask_deterministic(at: AppTest) -> tuple[str, str]:
    """(the action, who answered, as the caption under it says) of a deterministic decision."""
    click(at, "ask:predict_deterministic")
    caption = next(caption.value for caption in at.caption if caption.value.startswith("Deterministic at "))
    return metrics(at)["choice"], caption.partition(", ")[2]


def test_one_policy_has_no_choice_and_names_its_version(examples: dict[str, Server]) -> None:
    at = page(examples["pendulum"].url)
    assert not at.sidebar.selectbox  # nothing to choose: the root routes, as in wave 1
    assert "**pendulum** version 1 answers" in texts(at.sidebar.success)
    click(at, "ask:predict")
    assert "answered by pendulum version 1" in texts(at.caption)
    assert list(at.dataframe[0].value["version"]) == ["1"]


def test_each_policy_of_a_repository_is_asked_with_its_own_key(tmp_path: Path) -> None:
    """alpha (version 1, the default) and beta (versions 1 and 2): version N answers action N - 1."""
    root = tmp_path / "policies"
    make_policy(root, "alpha", [1])
    make_policy(root, "beta", [1, 2])
    with serving(root, POLICY_SERVER_DEFAULT="alpha") as server:
        at = page(server.url, api_key=KEYS["alpha"])
        choice = at.sidebar.selectbox(key="policy")
        assert (choice.options, choice.value) == (["alpha", "beta"], "alpha")
        assert ask_deterministic(at) == ("0", "answered by alpha version 1")

        at.sidebar.selectbox(key="policy").set_value("beta")
        run(at)
        assert "403: Wrong api key" in texts(at.sidebar.warning)  # alpha's key does not open beta
        at.sidebar.text_input(key="api_key").set_value(KEYS["beta"])
        run(at)
        assert "**beta** version 2 answers" in texts(at.sidebar.success)
        assert at.title[0].value == "beta policy"
        assert ask_deterministic(at) == ("1", "answered by beta version 2")

        at.sidebar.selectbox(key="policy").set_value("alpha")  # each policy keeps its key
        run(at)
        assert at.sidebar.text_input(key="api_key").value == KEYS["alpha"]
        assert ask_deterministic(at) == ("0", "answered by alpha version 1")
        history = at.dataframe[0].value
        assert list(zip(history["policy"], history["version"], history["action"], strict=True)) == [
            ("alpha", "1", "choice: 0"),
            ("beta", "2", "choice: 1"),
            ("alpha", "1", "choice: 0"),
        ]


def test_policy_schemas_of_a_repository_are_named_as_the_server_names_them(tmp_path: Path) -> None:
    make_policy(tmp_path, "alpha", [1])
    renamed = make_policy(tmp_path, "folder-b", [1])
    (renamed / "schema.yaml").write_text((renamed / "schema.yaml").read_text().replace("name: folder-b", "name: beta"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "schema.yaml").write_text("name: [not, a, name]\n")
    make_policy(tmp_path, ".hidden", [1])
    assert launcher.policy_schemas(tmp_path) == {
        "alpha": tmp_path / "alpha" / "schema.yaml",
        "beta": renamed / "schema.yaml",
        "broken": tmp_path / "broken" / "schema.yaml",
    }
    assert launcher.is_repository(tmp_path) and not launcher.is_repository(renamed)


# --- starting and stopping a server from the page ---------------------------------------------


def test_start_failure_shows_the_log_tail() -> None:
    with closing(socket.socket()) as taken:  # bound, not listening: connections are refused, binding fails
        taken.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        at = page(url)
        at.selectbox(key="policy_folder").set_value("examples/mouse_and_cheese")
        click(at, "start", timeout=launcher.READY_TIMEOUT_S)
        assert "The server exited with code" in texts(at.sidebar.error)
        assert "address already in use" in texts(at.code)
        assert launcher.started_here(url) is None


def test_start_and_stop_from_the_page() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    at = page(url, api_key="")
    at.selectbox(key="policy_folder").set_value("examples/pendulum")
    click(at, "start", timeout=launcher.READY_TIMEOUT_S)
    child = launcher.started_here(url)
    assert child is not None and child.running
    assert "pendulum" in texts(at.sidebar.success)
    assert at.sidebar.text_input(key="api_key").value  # a fresh key, which the started server takes
    click(at, "ask:predict")
    assert "torque" in metrics(at)

    click(at, "stop")
    assert child.process.returncode is not None and launcher.started_here(url) is None
    assert "Nothing answers" in texts(at.sidebar.error)


def test_start_every_example_as_one_server_and_use_each_schemas_key() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    at = page(url, api_key="")
    at.selectbox(key="policy_folder").set_value("examples/ (every example, one server)")
    click(at, "start", timeout=launcher.READY_TIMEOUT_S)
    try:
        choice = at.sidebar.selectbox(key="policy")
        assert (choice.options, choice.value) == (["mouse_and_cheese", "pendulum", "tuple_masking"], "mouse_and_cheese")
        assert at.sidebar.text_input(key="api_key").value == API_KEY  # the schema's key, not the random one the server was given
        choice.set_value("pendulum")
        run(at)
        click(at, "ask:predict")
        assert "torque" in metrics(at) and "answered by pendulum version 1" in texts(at.caption)
    finally:
        launcher.stop(url)


# --- a real browser; no orphan server ---------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: apt-get install chromium"
    expect.set_options(timeout=BROWSER_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextmanager
def streamlit_page(browser: Browser) -> Iterator[tuple[Server, Page]]:
    """`streamlit run frontend.py` headless on a free port, and a browser tab on it."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.port", str(port)]
    command += ["--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    command += ["--client.toolbarMode", "minimal"]
    with running_server(command, port, cwd=REPO, ready_path="/_stcore/health") as server:
        tab = browser.new_page(viewport={"width": 1400, "height": 1300})
        tab.set_default_timeout(BROWSER_TIMEOUT_MS)
        tab.goto(server.url)
        try:
            yield server, tab
        finally:
            tab.close()


def start_from_the_page(tab: Page, policy: str) -> str:
    """Type a URL where nothing answers, choose `policy`, press Start and wait for the form; the URL."""
    url = f"http://127.0.0.1:{free_port()}"
    url_field = tab.get_by_role("textbox", name="Server URL")
    url_field.fill(url)
    url_field.press("Enter")
    expect(tab.get_by_text(f"Nothing answers at {url}")).to_be_visible()
    tab.get_by_test_id("stSelectbox").click()
    tab.get_by_role("option", name=policy).click()
    tab.get_by_role("button", name="Start the server from schema").click()
    expect(tab.get_by_role("button", name="Predict (sampled)")).to_be_visible(timeout=START_TIMEOUT_MS)
    return url


def uvicorn_children(parent: int) -> list[int]:
    """The pids of the `uvicorn` processes whose parent is `parent`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"uvicorn" in command:
            found.append(int(stat.parent.name))
    return found


def gone(pid: int) -> bool:
    """True once `pid` has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def assert_gone(pid: int, url: str) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not gone(pid):
        os.killpg(pid, signal.SIGKILL)  # a failing test leaves no orphan behind either
        pytest.fail(f"the server {pid} outlived streamlit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def is_png_picture(path: Path) -> bool:
    """A real picture of a page: a PNG of some size, with many colours (not blank, not a single colour)."""
    with Image.open(path) as image:
        return image.format == "PNG" and image.width >= 800 and image.height >= 600 and len(image.getcolors(1 << 20) or []) > 50


def type_mouse(tab: Page, mouse: tuple[int, int], cheese: tuple[int, int]) -> None:
    for name, value in mouse_observation(mouse, cheese).items():
        field = tab.get_by_role("spinbutton", name=name, exact=True)
        field.fill(str(value))
        field.press("Enter")
        expect(field).to_have_value(f"{value:.2f}")


def ask(tab: Page, button: str, action: str) -> None:
    """Press `button` and wait until the answer shows `action` (no sampled action is asserted: it is random)."""
    tab.get_by_role("button", name=button, exact=True).click()
    expect(tab.get_by_text(f"{button} at ")).to_be_visible()
    expect(tab.get_by_test_id("stVegaLiteChart")).to_have_count(1)
    if action:
        expect(tab.get_by_test_id("stMetricValue").first).to_have_text(action)


def test_browser_user_story_then_no_orphan_after_sigterm(browser: Browser, tmp_path: Path) -> None:
    """Start a server from the page, change the observation, see the action and the distribution move."""
    with streamlit_page(browser) as (streamlit, tab):
        url = start_from_the_page(tab, "examples/mouse_and_cheese")
        type_mouse(tab, (3, 0), (3, 2))
        ask(tab, "Distribution", "right")
        expect(tab.get_by_text("(most likely)")).to_be_visible()
        type_mouse(tab, (0, 0), (3, 2))
        ask(tab, "Predict (sampled)", "")
        expect(tab.get_by_test_id("stMetricLabel").filter(has_text="probability")).to_be_visible()
        ask(tab, "Deterministic", "down")
        tab.wait_for_timeout(1000)  # the chart's drawing animation

        screenshot = tmp_path / "demo.png"
        tab.screenshot(path=screenshot)
        assert is_png_picture(screenshot)
        if os.environ.get("UPDATE_ASSETS") == "1":
            shutil.copyfile(screenshot, REPO / "assets" / "demo.png")

        with tab.expect_download() as download:
            tab.get_by_role("button", name="Download CSV").click()
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert [row["route"] for row in rows] == ["distribution", "predict", "predict_deterministic"]
        assert (rows[0]["action"], rows[2]["action"]) == ("move: right", "move: down")

        (child,) = uvicorn_children(streamlit.process.pid)
        streamlit.process.send_signal(signal.SIGTERM)
        streamlit.process.wait(30)
    assert_gone(child, url)


def test_no_orphan_when_streamlit_is_killed(browser: Browser) -> None:
    """SIGKILL leaves streamlit no time for its exit handlers: the kernel's parent-death signal ends the server."""
    with streamlit_page(browser) as (streamlit, tab):
        url = start_from_the_page(tab, "examples/tuple_masking")
        expect(tab.get_by_text("speed: fast")).to_be_visible()  # the form of the example chosen
        (child,) = uvicorn_children(streamlit.process.pid)
        log = Path(os.readlink(f"/proc/{child}/fd/1"))  # the server's log, which a killed streamlit cannot delete
        streamlit.process.send_signal(signal.SIGKILL)
        streamlit.process.wait(30)
    assert_gone(child, url)
    log.unlink()


# --- the episode toggle --------------------------------------------------------------------


def test_the_episode_toggle_logs_the_pages_decisions_as_steps(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log}")
    with serving(folder) as server:
        at = page(server.url)
        at.toggle(key="episode_on").set_value(True)
        run(at)
        first = at.session_state["episode_id"]
        click(at, "ask:predict")
        click(at, "ask:predict_deterministic")
        assert f"step 1 of episode {first}" in texts(at.caption)
        click(at, "new_episode")
        second = at.session_state["episode_id"]
        click(at, "ask:predict")
        click(at, "ask:distribution")  # not a decision: not a step
        at.toggle(key="episode_on").set_value(False)
        run(at)
        click(at, "ask:predict")  # off: not logged
        history = at.dataframe[0].value
        assert [e if isinstance(e, str) else None for e in history["episode"]][:3] == [None, None, second]  # newest first
    steps = read_table(folder / "log", "steps")
    assert first != second
    assert [(row["episode_id"], row["step"], row["deterministic"]) for row in steps] == [
        (first, 0, False),
        (first, 1, True),
        (second, 0, False),
    ]


def test_the_episode_toggle_says_when_the_policy_keeps_no_steps(examples: dict[str, Server]) -> None:
    at = page(examples["mouse_and_cheese"].url)
    at.toggle(key="episode_on").set_value(True)
    run(at)
    assert "logs no experience" in texts(at.caption)
    click(at, "ask:predict")
    assert "not logged" in texts(at.caption)
