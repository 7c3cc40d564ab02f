"""Client SDKs (issue 5, DESIGN.md GET /clients): the real openapi-generator, a real server, and the
generated Python SDK installed into a fresh venv and used as its README shows (the Java and R SDKs
are built and called in test_sdk_java.py and test_sdk_r.py).

Each generator run costs a JVM start (~3 s), so the SDKs of the mouse example are generated once
for the module and the other tests generate as little as they can.
"""

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, AUTH, MOUSE_OBSERVATION
from servers import REPO, Server, free_port, generate, run, running_server, uvicorn_command

from policy_server.clients import (
    JAVA_TIME_CLASSES,
    JAVA_TIME_MODULE,
    LANGUAGES,
    SECONDS_PER_LANGUAGE,
    ClientSDKError,
    ClientSDKs,
    GenerationFailed,
    JavaMissing,
    SDKsNotReady,
    UnknownLanguage,
    without_java_time,
)
from policy_server.loading import load_policy_spec
from policy_server.server import build_app
from policy_server.settings import Settings

MOUSE = REPO / "examples" / "mouse_and_cheese"
FIELDS = ("mouse_row", "mouse_col", "mouse_row_distance", "mouse_col_distance", "cheese_row", "cheese_col")
JAVA_PACKAGE = "java/src/main/java/policyserver/mouse_and_cheese/client"
Spec = tuple[dict[str, Any], str]

# What a user writes after reading the generated README: configuration, api key, ApiClient, PolicyApi.
SDK_SCRIPT = """
import json
import sys

import mouse_and_cheese_client
from mouse_and_cheese_client.exceptions import ForbiddenException

url, key, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
configuration = mouse_and_cheese_client.Configuration(host=url)
configuration.api_key["APIKeyHeader"] = key


def decision(answer):
    return {
        "class": type(answer).__name__,
        "actions": answer.actions,
        "action_types": sorted({type(action).__name__ for action in answer.actions}),
        "probability": answer.probability,
        "probability_type": type(answer.probability).__name__,
    }


with mouse_and_cheese_client.ApiClient(configuration) as api_client:
    api = mouse_and_cheese_client.PolicyApi(api_client)
    observation = mouse_and_cheese_client.Observation(**fields)
    try:
        sampled = api.predict(observation, seed=7)
    except ForbiddenException as error:
        print(json.dumps({"forbidden": error.status}))
        sys.exit(0)
    distribution = api.distribution(observation)
    print(json.dumps({
        "predict": decision(sampled),
        "predict_again": decision(api.predict(observation, seed=7)),
        "predict_deterministic": decision(api.predict_deterministic(observation)),
        "distribution_class": type(distribution).__name__,
        "heads": [head.to_dict() for head in distribution.heads],
        "head_class": type(distribution.heads[0]).__name__,
    }))
"""


@pytest.fixture(scope="module")
def mouse_spec() -> Spec:
    """The mouse example's OpenAPI spec, built as the server and `generate.py clients` build it, and its name."""
    return build_app(Settings(policy_dir=MOUSE)).openapi(), load_policy_spec(MOUSE).name


@pytest.fixture(scope="module")
def sdks(mouse_spec: Spec, tmp_path_factory: pytest.TempPathFactory) -> ClientSDKs:
    """The SDKs of the mouse example, generated once for the module."""
    spec, name = mouse_spec
    generated = ClientSDKs(spec, name, tmp_path_factory.mktemp("sdk-cache"))
    asyncio.run(generated.build())
    return generated


@pytest.fixture(scope="module")
def sdk_python(sdks: ClientSDKs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the generated Python SDK (installed from its zip) and its dependencies."""
    venv = tmp_path_factory.mktemp("sdk-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(sdks.archive("python"))], cwd=venv, timeout=300
    )
    assert installed.returncode == 0, installed.stderr
    return python


@pytest.fixture(scope="module")
def mouse_server() -> Iterator[Server]:
    """`uvicorn app:app` serving the mouse example, as a user runs it."""
    port = free_port()
    with running_server(uvicorn_command(port), port, cwd=MOUSE) as server:
        yield server


def read(archive: Path, member: str) -> str:
    with zipfile.ZipFile(archive) as source:
        return source.read(member).decode()


def without_nulls(heads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in head.items() if value is not None} for head in heads]


def camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


async def settle(sdks: ClientSDKs, language: str | None = None, timeout: float = 120.0) -> Path | ClientSDKError:
    """Ask for the archive as a client would, until it is there or refused for good."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return sdks.archive(language)
        except SDKsNotReady:
            await asyncio.sleep(0.1)
        except ClientSDKError as error:
            return error
    raise AssertionError(f"not ready within {timeout} s")


def generator_pids(directory: Path) -> list[int]:
    """Processes whose command line names `directory`: the generators working for that cache."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(directory).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # ended meanwhile
    return pids


def test_every_archive_is_a_valid_zip_of_its_language_without_the_api_key(sdks: ClientSDKs) -> None:
    assert sdks.generated == list(LANGUAGES)
    for language in (*LANGUAGES, None):
        with zipfile.ZipFile(sdks.archive(language)) as archive:
            assert archive.testzip() is None
            folders = {name.split("/")[0] for name in archive.namelist()}
            assert folders == ({language} if language else set(LANGUAGES))
            for member in archive.namelist():
                assert API_KEY.encode() not in archive.read(member), member
    assert sdks.archive(None).name == "clients.zip"


def test_python_sdk_calls_a_running_server(sdk_python: Path, mouse_server: Server) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}  # nothing of the test's own venv
    command = [str(sdk_python), "-c", SDK_SCRIPT, mouse_server.url, API_KEY, json.dumps(MOUSE_OBSERVATION)]
    used = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert used.returncode == 0, used.stderr
    answers = json.loads(used.stdout)

    for route in ("predict", "predict_again", "predict_deterministic"):
        decision = answers[route]
        assert decision["class"] == "Decision"
        assert decision["action_types"] == ["int"] and len(decision["actions"]) == 1 and 0 <= decision["actions"][0] < 4
        assert decision["probability_type"] == "float" and 0 < decision["probability"] <= 1
    assert answers["predict_again"] == answers["predict"]  # the seed reaches the server
    assert answers["distribution_class"] == "Distribution" and answers["head_class"] == "HeadDistribution"

    with httpx.Client(base_url=mouse_server.url, headers=AUTH, timeout=30.0) as client:
        assert client.post("/predict_deterministic", json=MOUSE_OBSERVATION).json() == {
            key: answers["predict_deterministic"][key] for key in ("actions", "probability")
        }
        assert client.post("/predict", params={"seed": 7}, json=MOUSE_OBSERVATION).json()["actions"] == answers["predict"]["actions"]
        heads = client.post("/distribution", json=MOUSE_OBSERVATION).json()["heads"]
    assert without_nulls(answers["heads"]) == without_nulls(heads)
    assert answers["heads"][0]["name"] == "move" and answers["heads"][0]["labels"] == ["up", "down", "left", "right"]


def test_python_sdk_with_a_wrong_key_gets_its_403_exception(sdk_python: Path, mouse_server: Server) -> None:
    command = [str(sdk_python), "-c", SDK_SCRIPT, mouse_server.url, "wrong-key", json.dumps(MOUSE_OBSERVATION)]
    used = subprocess.run(command, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, timeout=60, check=False)
    assert used.returncode == 0, used.stderr
    assert json.loads(used.stdout) == {"forbidden": 403}


def test_python_sdk_is_named_after_the_policy_and_has_every_route(sdks: ClientSDKs) -> None:
    archive = sdks.archive("python")
    api = read(archive, "python/mouse_and_cheese_client/api/policy_api.py")
    for method in ("predict", "predict_deterministic", "distribution", "predict_raw", "predict_batch"):
        assert f"    def {method}(\n" in api
    observation = read(archive, "python/mouse_and_cheese_client/models/observation.py")
    for field in FIELDS:
        assert f"    {field}: Union[" in observation
    assert "'access-token'" in read(archive, "python/mouse_and_cheese_client/configuration.py")
    assert 'name = "mouse_and_cheese_client"' in read(archive, "python/pyproject.toml")


def test_java_sdk_has_the_observation_model_and_the_routes_and_no_java_time(sdks: ClientSDKs) -> None:
    archive = sdks.archive("java")
    observation = read(archive, f"{JAVA_PACKAGE}/model/Observation.java")
    assert "package policyserver.mouse_and_cheese.client.model;" in observation
    for field in FIELDS:
        assert f'JSON_PROPERTY_{field.upper()} = "{field}";' in observation
        assert f"private Double {camel(field)};" in observation
        assert f"public Double get{camel(field)[0].upper()}{camel(field)[1:]}()" in observation
    api = read(archive, f"{JAVA_PACKAGE}/api/PolicyApi.java")
    for method, answer in {
        "predict": "Decision",
        "predictDeterministic": "Decision",
        "distribution": "Distribution",
        "predictRaw": "Decision",
        "predictBatch": "BatchDecisions",
    }.items():
        assert f"public {answer} {method}(" in api
    assert "import java.net.http.HttpClient;" in read(archive, f"{JAVA_PACKAGE}/ApiClient.java")
    with zipfile.ZipFile(archive) as source:
        sources = {name: source.read(name) for name in source.namelist() if name.endswith(".java")}
    assert not any(name.endswith(JAVA_TIME_CLASSES) for name in sources)
    assert not any(b"jsr310" in text or JAVA_TIME_MODULE.encode() in text for text in sources.values())
    assert not any(name in read(archive, "java/.openapi-generator/FILES") for name in JAVA_TIME_CLASSES)
    assert "<artifactId>mouse-and-cheese-client</artifactId>" in read(archive, "java/pom.xml")


def test_a_java_source_still_needing_java_time_fails_the_generation(tmp_path: Path) -> None:
    source = tmp_path / "src" / "main" / "java" / "Dates.java"
    source.parent.mkdir(parents=True)
    source.write_text("import com.fasterxml.jackson.datatype.jsr310.deser.InstantDeserializer;\n")
    (tmp_path / ".openapi-generator").mkdir()
    (tmp_path / ".openapi-generator" / "FILES").write_text("src/main/java/Dates.java\n")
    with pytest.raises(GenerationFailed, match=r"^java: src/main/java/Dates.java still needs jackson-datatype-jsr310"):
        without_java_time(tmp_path)


def test_r_sdk_has_the_observation_model_the_auth_header_and_the_routes(sdks: ClientSDKs) -> None:
    archive = sdks.archive("r")
    assert "Package: mouse.and.cheese.client\n" in read(archive, "r/DESCRIPTION")
    observation = read(archive, "r/R/observation.R")
    for field in FIELDS:
        assert f"`{field}` = NULL" in observation
    api = read(archive, "r/R/policy_api.R")
    for method in ("Predict", "PredictDeterministic", "Distribution", "PredictRaw", "PredictBatch"):
        assert f"    {method} = function(" in api
    assert '"access-token"' in api
    assert "Imports: jsonlite, httr, R6, base64enc, stringr\n" in read(archive, "r/DESCRIPTION")  # all of them Debian's r-cran-*


def test_a_second_instance_serves_the_cache_without_generating(sdks: ClientSDKs, mouse_spec: Spec, tmp_path: Path) -> None:
    spec, name = mouse_spec
    before = {language: sdks.archive(language).stat().st_mtime_ns for language in (*LANGUAGES, None)}
    # No Java needed for what is cached already.
    again = ClientSDKs(spec, name, sdks.directory.parent, java=str(tmp_path / "no-java"))
    assert again.directory == sdks.directory
    asyncio.run(again.build())
    assert again.generated == []
    assert {language: again.archive(language).stat().st_mtime_ns for language in (*LANGUAGES, None)} == before


def test_a_different_spec_or_name_gets_its_own_cache_folder(mouse_spec: Spec, tmp_path: Path) -> None:
    spec, name = mouse_spec
    changed = copy.deepcopy(spec)
    changed["components"]["schemas"]["Observation"]["properties"]["mouse_row"]["maximum"] = 9.0
    folders = {
        ClientSDKs(spec, name, tmp_path).directory,
        ClientSDKs(changed, name, tmp_path).directory,
        ClientSDKs(spec, "other_policy", tmp_path).directory,
    }
    assert len(folders) == 3
    assert ClientSDKs(copy.deepcopy(spec), name, tmp_path).directory == ClientSDKs(spec, name, tmp_path).directory
    assert all(len(folder.name) == 16 and folder.parent == tmp_path for folder in folders)


def test_not_ready_while_generating_and_stop_kills_the_generator(mouse_spec: Spec, tmp_path: Path) -> None:
    spec, name = mouse_spec

    async def scenario() -> tuple[ClientSDKs, dict[str | None, int], list[int]]:
        sdks = ClientSDKs(spec, name, tmp_path)
        await sdks.start()
        waits = {}
        for language in ("python", "r", None):
            with pytest.raises(SDKsNotReady) as refused:
                sdks.archive(language)
            waits[language] = refused.value.retry_after
        deadline = time.monotonic() + 30
        while not (pids := generator_pids(sdks.directory)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await sdks.stop()
        return sdks, waits, pids

    sdks, waits, pids = asyncio.run(scenario())
    assert waits == {"python": SECONDS_PER_LANGUAGE, "r": 3 * SECONDS_PER_LANGUAGE, None: 3 * SECONDS_PER_LANGUAGE}
    assert pids, "the generator never started"
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "a generator outlived stop()"
    assert sorted(path.name for path in sdks.directory.iterdir()) == [".lock", "openapi.json"]  # no zip, no temp left
    with pytest.raises(SDKsNotReady):
        sdks.archive("python")


def test_java_missing(mouse_spec: Spec, tmp_path: Path) -> None:
    spec, name = mouse_spec

    async def scenario() -> Path | ClientSDKError:
        sdks = ClientSDKs(spec, name, tmp_path, java=str(tmp_path / "bin" / "java"))
        await sdks.start()
        refusal = await settle(sdks, "python")
        await sdks.stop()
        return refusal

    refusal = asyncio.run(scenario())
    assert isinstance(refusal, JavaMissing)
    assert "JRE 11+" in str(refusal) and "apt-get install default-jre-headless" in str(refusal)


def test_unknown_language(sdks: ClientSDKs) -> None:
    with pytest.raises(UnknownLanguage, match=r"'cobol'.*python, java, r"):
        sdks.archive("cobol")
    with pytest.raises(UnknownLanguage):
        ClientSDKs({}, "policy", Path("unused"), languages=("python", "cobol"))


def test_a_generator_failure_is_one_short_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = {"openapi": "3.1.0", "info": {"title": "broken"}, "paths": {"/predict": {"post": {"responses": "none"}}}}
    sdks = ClientSDKs(broken, "broken", tmp_path, languages=("python",))
    with pytest.raises(GenerationFailed) as failed:
        asyncio.run(sdks.build())
    reason = str(failed.value)
    assert reason.startswith("python: invalid OpenAPI spec: ") and "info.version is missing" in reason
    assert "\n" not in reason and len(reason) < 400
    assert "openapi-generator failed for python" in caplog.text  # the whole output is in the log
    with pytest.raises(GenerationFailed):
        sdks.archive("python")


def test_two_instances_on_one_cache_generate_each_language_once(mouse_spec: Spec, tmp_path: Path) -> None:
    """As two uvicorn workers sharing a cache: the file lock makes them take turns, never write the same file at once."""
    spec, name = mouse_spec
    languages = ("python", "r")

    async def scenario() -> tuple[ClientSDKs, ClientSDKs, list[Path | ClientSDKError]]:
        first, second = (ClientSDKs(spec, name, tmp_path, languages=languages) for _ in range(2))
        await asyncio.gather(first.start(), second.start())
        answers = await asyncio.gather(*(settle(sdks, language) for sdks in (first, second) for language in (*languages, None)))
        await asyncio.gather(first.stop(), second.stop())
        return first, second, list(answers)

    first, second, answers = asyncio.run(scenario())
    assert sorted(first.generated + second.generated) == sorted(languages)
    assert answers[:3] == answers[3:]
    for answer in answers:
        assert isinstance(answer, Path)
        with zipfile.ZipFile(answer) as archive:
            assert archive.testzip() is None
    assert sorted(path.name for path in first.directory.iterdir()) == [".lock", "clients.zip", "openapi.json", "python.zip", "r.zip"]


def test_generate_clients_command(tmp_path: Path) -> None:
    out = tmp_path / "sdk"
    result = generate("clients", "--languages=python", "--out", str(out), "--directory", str(MOUSE))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["python", "python.zip"]
    with zipfile.ZipFile(out / "python.zip") as archive:
        assert archive.testzip() is None
    assert (out / "python" / "mouse_and_cheese_client" / "api" / "policy_api.py").is_file()
    assert (out / "python" / "pyproject.toml").is_file()


def test_generate_clients_without_java_is_one_line(tmp_path: Path) -> None:
    result = generate("clients", "--out", str(tmp_path / "sdk"), "--directory", str(MOUSE), env={"PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "JRE" in lines[0], result.stderr
    assert not (tmp_path / "sdk").exists()


@pytest.mark.parametrize("args", [("--directory", "."), ("--languages=python,cobol",)])
def test_generate_clients_refuses_a_bad_folder_or_language_in_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    result = generate("clients", "--out", str(tmp_path / "sdk"), *args, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ("invalid:" in lines[0] or "cobol" in lines[0]), result.stderr


def test_generate_clients_help() -> None:
    result = generate("clients", "--help")
    assert result.returncode == 0 and "--languages" in result.stdout + result.stderr
