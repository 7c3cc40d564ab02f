"""The R SDK (issue 15): downloaded from a real server's /clients/r, installed with `R CMD INSTALL`
into a library of its own (its imports are Debian's r-cran packages), and called by an Rscript as
its docs show. Its answers are the REST routes' answers; a wrong key stops the call with an error
the script catches.

The SDK is generated and installed once for the module.
"""

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY
from sdk_support import OBSERVATIONS, SEED, approximately, download_sdk, example_server, rest_answers, without_nulls, wrong_key_answer
from servers import Server

EXAMPLE = "mouse_and_cheese"
PACKAGE = "mouse.and.cheese.client"
INSTALL_TIMEOUT_S = 300
RUN_TIMEOUT_S = 60
# jsonlite writes numbers with 15 significant digits; the server's are doubles (17).
PRINTED_PRECISION = 1e-13

# What a user writes after reading the generated docs (docs/PolicyApi.md): a PolicyApi on the
# server's address, the key in api_keys, the calls; lists come back as R lists (unlist them).
SCRIPT = """
library(jsonlite)
library(@PACKAGE@)

args <- commandArgs(trailingOnly = TRUE)
fields <- fromJSON(args[[3]])
api <- PolicyApi$new(ApiClient$new(base_path = args[[1]]))
api$api_client$api_keys["access-token"] <- args[[2]]

observation <- do.call(Observation$new, fields)
agent <- do.call(BatchObservation$new, fields)
scalar <- function(value) if (is.null(value)) NULL else unbox(value)
decision <- function(answer) list(actions = unlist(answer$actions), probability = scalar(answer$probability))
head <- function(answer) {
  list(name = unbox(answer$name), labels = unlist(answer$labels), probabilities = unlist(answer$probabilities),
       mean = unlist(answer$mean), std = unlist(answer$std))
}

sampled <- tryCatch(api$Predict(observation, seed = @SEED@), error = function(error) error)
if (inherits(sampled, "error")) {
  cat(toJSON(list(error = unbox(conditionMessage(sampled)))))
  quit(status = 0)
}
batch <- api$PredictBatch(ObservationBatch$new(list(agent, agent)), seed = @SEED@)
cat(toJSON(list(
  predict = decision(sampled),
  predict_deterministic = decision(api$PredictDeterministic(observation)),
  predict_batch = list(results = lapply(batch$results, decision)),
  distribution = list(heads = lapply(api$Distribution(observation)$heads, head))
), digits = NA, null = "null"))
"""


@dataclass
class RScript:
    server: Server
    library: Path
    script: Path

    def run(self, key: str) -> dict[str, Any]:
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "R_LIBS": str(self.library)}
        command = ["Rscript", str(self.script), self.server.url, key, json.dumps(OBSERVATIONS[EXAMPLE])]
        used = subprocess.run(command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S, check=False)
        assert used.returncode == 0, used.stderr
        answers: dict[str, Any] = json.loads(used.stdout)
        return answers


@pytest.fixture(scope="module")
def r_script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RScript]:
    """The example's server, its R SDK installed into a library of its own, and the script calling it."""
    work = tmp_path_factory.mktemp("r-sdk")
    library = work / "library"
    library.mkdir()
    with example_server(EXAMPLE) as server:
        sdk = download_sdk(server, "r", work)
        # Without its help pages and byte code (a quarter of the time): the package itself is what is tested.
        command = ["R", "CMD", "INSTALL", "--no-docs", "--no-byte-compile", f"--library={library}", str(sdk)]
        installed = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
        assert installed.returncode == 0, (installed.stdout + installed.stderr)[-4000:]
        script = work / "predict.R"
        script.write_text(SCRIPT.replace("@PACKAGE@", PACKAGE).replace("@SEED@", str(SEED)))
        yield RScript(server, library, script)


def test_r_sdk_answers_as_the_rest_routes(r_script: RScript) -> None:
    answers = r_script.run(API_KEY)
    expected = rest_answers(r_script.server, OBSERVATIONS[EXAMPLE])
    assert without_nulls(answers) == approximately(expected, PRINTED_PRECISION)  # actions and labels exactly


def test_r_sdk_with_a_wrong_key_stops_with_the_servers_detail(r_script: RScript) -> None:
    refused = wrong_key_answer(r_script.server, OBSERVATIONS[EXAMPLE])
    assert refused.status_code == 403
    answers = r_script.run("wrong-key")
    assert json.loads(answers["error"]) == refused.json()
