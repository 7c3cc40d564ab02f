"""The Java SDK (issue 15): downloaded from a real server's /clients/java, compiled with `javac`
against the jars Debian packages (no Maven repository), and called by a small program as its
README shows, with Java's own HttpClient (which asks for an h2c upgrade). Its answers are the REST
routes' answers.

Each example's SDK is generated and compiled once for the module.
"""

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, REPO
from sdk_support import OBSERVATIONS, SEED, download_sdk, example_server, rest_answers, without_nulls, wrong_key_answer
from servers import Server

# What `apt-get install libjackson2-databind-java libjakarta-annotation-api-java` puts there (.ci/run does).
DEBIAN_JARS = tuple(
    Path("/usr/share/java") / f"{name}.jar"
    for name in ("jackson-databind", "jackson-core", "jackson-annotations", "jakarta-annotation-api")
)
COMPILE_TIMEOUT_S = 180
RUN_TIMEOUT_S = 60

# What a user writes after reading the generated README: an ApiClient on the server's address, the
# key on every request, PolicyApi's calls; @PACKAGE@ and @FIELDS@ are the example's.
MAIN = """
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import @PACKAGE@.ApiClient;
import @PACKAGE@.ApiException;
import @PACKAGE@.JSON;
import @PACKAGE@.api.PolicyApi;
import @PACKAGE@.model.*;

public class Main {
    public static void main(String[] args) throws Exception {
        ApiClient client = new ApiClient();
        client.updateBaseUri(args[0]);
        client.setRequestInterceptor(request -> request.header("access-token", args[1]));
        PolicyApi api = new PolicyApi(client);

        Observation observation = new Observation()@FIELDS@;
        BatchObservation agent = new BatchObservation()@FIELDS@;
        Map<String, Object> answers = new LinkedHashMap<>();
        try {
            Decision sampled = api.predict(observation, @SEED@, null, null, null);
            List<Integer> actions = sampled.getActions();  // the SDK's types: integers, and doubles for numbers
            Double probability = sampled.getProbability();
            answers.put("predict", sampled);
        } catch (ApiException error) {
            System.out.println("{\\"forbidden\\": " + error.getCode() + "}");
            return;
        }
        answers.put("predict_deterministic", api.predictDeterministic(observation, null, null, null, null));
        answers.put("predict_batch", api.predictBatch(new ObservationBatch().observations(List.of(agent, agent)), @SEED@, false, null, null));
        answers.put("distribution", api.distribution(observation, null, null, null));
        System.out.println(JSON.getDefault().getMapper().writeValueAsString(answers));
    }
}
"""


@dataclass
class JavaProgram:
    server: Server
    classpath: str
    observation: dict[str, Any]
    work: Path

    def run(self, key: str) -> dict[str, Any]:
        command = ["java", "-cp", self.classpath, "Main", self.server.url, key]
        used = subprocess.run(command, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, timeout=RUN_TIMEOUT_S, check=False)
        assert used.returncode == 0, used.stderr
        answers: dict[str, Any] = json.loads(used.stdout)
        return answers


def camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def java_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return f"List.of({', '.join(java_literal(item) for item in value)})"
    return repr(float(value))


def main_source(example: str) -> str:
    fields = "".join(f".{camel(name)}({java_literal(value)})" for name, value in OBSERVATIONS[example].items())
    replacements = {
        "@PACKAGE@": f"policyserver.{example}.client",
        "@FIELDS@": fields,
        "@SEED@": str(SEED),
    }
    source = MAIN
    for placeholder, value in replacements.items():
        source = source.replace(placeholder, value)
    return source


def javac(sources: list[Path], classpath: str, classes: Path) -> None:
    """Compile `sources` into `classes` (one javac, the file names in an argument file)."""
    argfile = classes.parent / f"{classes.name}-sources.txt"
    argfile.write_text("\n".join(str(source) for source in sources))
    compiled = subprocess.run(
        ["javac", "-d", str(classes), "-cp", classpath, f"@{argfile}"],
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
        check=False,
    )
    assert compiled.returncode == 0, compiled.stderr[-4000:]


@pytest.fixture(scope="module", params=sorted(OBSERVATIONS))
def java_program(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JavaProgram]:
    """The example's server, and its Java SDK compiled with a Main calling it."""
    example: str = request.param
    missing = [str(jar) for jar in DEBIAN_JARS if not jar.is_file()]
    assert not missing, f"{missing}: apt-get install libjackson2-databind-java libjakarta-annotation-api-java"
    work = tmp_path_factory.mktemp(f"java-{example}")
    with example_server(example) as server:
        sdk = download_sdk(server, "java", work)
        debian = ":".join(str(jar) for jar in DEBIAN_JARS)
        javac(sorted((sdk / "src" / "main" / "java").rglob("*.java")), debian, work / "sdk-classes")
        main = work / "Main.java"
        main.write_text(main_source(example))
        javac([main], f"{debian}:{work / 'sdk-classes'}", work / "main-classes")
        yield JavaProgram(server, f"{debian}:{work / 'sdk-classes'}:{work / 'main-classes'}", OBSERVATIONS[example], work)


def test_java_sdk_answers_as_the_rest_routes(java_program: JavaProgram) -> None:
    answers = java_program.run(API_KEY)
    assert without_nulls(answers) == rest_answers(java_program.server, java_program.observation)  # the same seed, the same actions
    assert len(answers["predict_batch"]["results"]) == 2


def test_java_sdk_with_a_wrong_key_gets_its_api_exception_with_403(java_program: JavaProgram) -> None:
    assert wrong_key_answer(java_program.server, java_program.observation).status_code == 403
    assert java_program.run("wrong-key") == {"forbidden": 403}


def readme_java_main() -> str:
    """The `Main.java` the README's "Calling from Java" shows, as a user copies it."""
    section = (REPO / "README.md").read_text().split("`Main.java` (the key goes on every request", 1)[1]
    return section.split("```java\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("java_program", ["mouse_and_cheese"], indirect=True)
def test_the_readmes_java_main_compiles_and_prints_what_predict_answers(java_program: JavaProgram) -> None:
    readme = java_program.work / "readme"
    readme.mkdir()
    (readme / "Main.java").write_text(readme_java_main().replace("http://127.0.0.1:8000", java_program.server.url))
    javac([readme / "Main.java"], java_program.classpath, readme / "classes")
    command = ["java", "-cp", f"{readme / 'classes'}:{java_program.classpath}", "Main"]  # before the fixture's own Main
    used = subprocess.run(command, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, timeout=RUN_TIMEOUT_S, check=False)
    assert used.returncode == 0, used.stderr
    actions, probability = used.stdout.strip().rsplit(" ", 1)
    readme_observation = {
        "mouse_row": 0.0,
        "mouse_col": 0.0,
        "mouse_row_distance": 3.0,
        "mouse_col_distance": 2.0,
        "cheese_row": 3.0,
        "cheese_col": 2.0,
    }
    expected = rest_answers(java_program.server, readme_observation)["predict"]  # the README's seed is SEED
    assert json.loads(actions) == expected["actions"]
    assert float(probability) == pytest.approx(expected["probability"])
