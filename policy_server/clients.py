"""Client SDKs (python, java, r) generated from the app's OpenAPI spec by openapi-generator.

Knows nothing of HTTP: it gets the spec as a dict and hands back zip files. Generation runs the
generator JAR (shipped by the `openapi-generator-cli` package) with a Java runtime, one language
at a time, in the background; the archives are cached on disk under a hash of everything that
determines them, so a restart, or a second worker sharing the cache, generates nothing again.

Every write goes to a temporary name first and is then renamed (`os.replace`, atomic), and a
generator only runs while its process holds an exclusive `flock` on the cache folder's lock file:
two processes never generate into the same place, and a reader never sees a partial zip.

Each SDK builds with what Debian packages (the suite compiles and calls them): Python with pip,
Java with `javac` against Debian's Jackson and Jakarta annotation jars, R with `R CMD INSTALL` and
Debian's r-cran packages. There is no Scala SDK: every Scala client openapi-generator makes is
built on an HTTP library Debian does not package (sttp, akka, pekko or http4s), for a newer Scala
than Debian's 2.11.
"""

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger("policy_server.clients")

LANGUAGES = ("python", "java", "r")
GENERATORS: Mapping[str, str] = {"python": "python", "java": "java", "r": "r"}
# Java's default for a JSON number is BigDecimal; the policy's numbers are doubles, and a simulation
# (e.g. AnyLogic) wants to pass its doubles as they are.
TYPE_MAPPINGS: Mapping[str, tuple[str, ...]] = {"java": ("--type-mappings=number=Double",)}
# The `native` Java library's ObjectMapper registers Jackson's java.time module (jackson-datatype-jsr310),
# which Debian does not package; the other libraries need it too, or gson-fire, and an HTTP library
# Debian lacks as well (okhttp 4, Jersey, Spring...). The policy's spec has no date or time anywhere,
# so the SDK goes without it: these two classes (java.time parsers) are not kept, and the lines
# naming the module are dropped.
JAVA_TIME_CLASSES = ("RFC3339InstantDeserializer.java", "RFC3339JavaTimeModule.java")
JAVA_TIME_MODULE = "JavaTimeModule"
ALL = "clients"  # the archive holding every language, one folder each
SECONDS_PER_LANGUAGE = 5  # one generator run on a 2-core machine (3-6 s measured), for Retry-After
GENERATOR_TIMEOUT_S = 300.0
LOCK_POLL_S = 0.1
# A generator run is a short JVM life: the C1 compiler alone and one GC thread make it about twice
# as fast (6 s → 3 s measured) and leave the other core to the server.
JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
# Words that cannot be a Java package segment (the reserved keywords and literals).
_JAVA_KEYWORDS = (
    "abstract assert boolean break byte case catch char class const continue default do double else enum extends false final "
    "finally float for goto if implements import instanceof int interface long native new null package private protected public "
    "return short static strictfp super switch synchronized this throw throws transient true try void volatile while"
)
JAVA_KEYWORDS = frozenset(_JAVA_KEYWORDS.split())


class ClientSDKError(Exception):
    """Why an SDK archive cannot be handed out."""


class UnknownLanguage(ClientSDKError):
    def __init__(self, language: str, supported: Sequence[str] = LANGUAGES) -> None:
        super().__init__(f"No SDK for {language!r}: the languages are {', '.join(supported)}.")


class SDKsNotReady(ClientSDKError):
    """Generation is under way (or about to start): ask again in `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"The client SDKs are being generated; retry in {retry_after} s.")


class JavaMissing(ClientSDKError):
    def __init__(self, java: str) -> None:
        super().__init__(
            f"Generating client SDKs needs a Java runtime (JRE 11+) and {java!r} was not found: "
            "install one (e.g. `apt-get install default-jre-headless`), then start again."
        )


class GenerationFailed(ClientSDKError):
    """The generator failed; the message is a short reason, the log holds its whole output."""


class ClientSDKs:
    """The SDKs of one OpenAPI spec, generated once into `cache_root/<hash>/` and served from there.

    `start()` generates what is missing in the background; `archive()` answers at once with a
    ready zip or says why there is none yet. `build()` is the same generation, awaited.
    """

    def __init__(
        self,
        openapi: Mapping[str, Any],
        policy_name: str,
        cache_root: Path,
        *,
        languages: Sequence[str] = LANGUAGES,
        java: str = "java",
    ) -> None:
        for language in languages:
            if language not in GENERATORS:
                raise UnknownLanguage(language)
        self.languages = tuple(languages)
        self.java = java
        self.openapi = openapi
        self._jar, self._generator_version = _bundled_generator()
        self._options = {
            language: generator_options(language, policy_name, str(openapi.get("info", {}).get("version", "1.0.0")))
            for language in self.languages
        }
        self.directory = Path(cache_root) / cache_key(openapi, self._options, self._generator_version)
        self.generated: list[str] = []  # the languages this instance ran the generator for
        self._failures: dict[str, GenerationFailed] = {}
        self._unavailable: ClientSDKError | None = None  # set when nothing more can be generated
        self._task: asyncio.Task[None] | None = None

    def _archive_path(self, language: str | None = None) -> Path:
        """Where the zip of `language` (None: all of them) is, or will be, in the cache."""
        return self.directory / f"{language or ALL}.zip"

    def archive(self, language: str | None = None) -> Path:
        """The ready zip of `language` (None: every language, one folder each).

        Raises UnknownLanguage, SDKsNotReady (generation under way, or `start()` not called yet),
        JavaMissing or GenerationFailed.
        """
        if language is not None and language not in self.languages:
            raise UnknownLanguage(language, self.languages)
        path = self._archive_path(language)
        if path.is_file():
            return path
        if self._unavailable is not None:
            raise self._unavailable
        needed = self.languages if language is None else (language,)
        for failure in (self._failures.get(name) for name in (*needed, ALL)):
            if failure is not None:
                raise failure
        raise SDKsNotReady(self._retry_after(needed))

    async def start(self) -> None:
        """Generate whatever is not cached yet, in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._build_in_background(), name="client-sdks")

    async def stop(self) -> None:
        """Cancel the generation under way; its generator process is killed and reaped."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def build(self) -> None:
        """Generate every archive not cached yet, one language at a time.

        A failing language does not stop the others; the first failure is raised at the end
        (and kept for `archive()`). Raises JavaMissing or GenerationFailed.
        """
        self._failures.clear()
        if not all(self._archive_path(language).is_file() for language in self.languages):
            self._unavailable = self._missing_tool()
            if self._unavailable is not None:
                raise self._unavailable
        for language in self.languages:
            try:
                await self._build_language(language)
            except GenerationFailed as failure:
                self._failures[language] = failure
            except OSError as error:
                self._failures[language] = GenerationFailed(f"{language}: cannot write to {self.directory}: {error}")
        if self._failures:
            raise next(iter(self._failures.values()))
        try:
            await self._bundle()
        except OSError as error:
            self._failures[ALL] = GenerationFailed(f"cannot write to {self.directory}: {error}")
            raise self._failures[ALL] from error

    async def _build_in_background(self) -> None:
        try:
            await self.build()
        except ClientSDKError as error:  # kept for archive() to raise
            logger.warning("client SDKs: %s", error)
        except Exception as error:
            logger.exception("generating the client SDKs failed")
            self._unavailable = GenerationFailed(f"unexpected error: {error}")

    def _missing_tool(self) -> ClientSDKError | None:
        if shutil.which(self.java) is None:
            return JavaMissing(self.java)
        if self._jar is None:
            return GenerationFailed("the openapi-generator-cli package is not installed: pip install openapi-generator-cli")
        return None

    def _retry_after(self, needed: Sequence[str]) -> int:
        """Seconds until the last of `needed` should be ready, languages being made in order."""
        last = max(self.languages.index(language) for language in needed)
        waiting = [language for language in self.languages[: last + 1] if not self._archive_path(language).is_file()]
        return max(1, SECONDS_PER_LANGUAGE * len(waiting))

    async def _build_language(self, language: str) -> None:
        target = self._archive_path(language)
        if target.is_file():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        async with self._locked():
            if target.is_file():  # another process made it while this one waited
                return
            spec = self._write_spec()
            output = Path(tempfile.mkdtemp(prefix=f".{language}-", dir=self.directory))
            try:
                await self._run_generator(language, spec, output)
                if language == "java":
                    await asyncio.to_thread(without_java_time, output)
            except BaseException:
                shutil.rmtree(output, ignore_errors=True)
                raise
            # Shielded: once the generator is done, the zip is finished even if this task is cancelled.
            await asyncio.shield(asyncio.to_thread(_pack, output, language, target))
            self.generated.append(language)

    async def _bundle(self) -> None:
        target = self._archive_path(None)
        if target.is_file():
            return
        async with self._locked():
            if not target.is_file():
                await asyncio.to_thread(_merge, [self._archive_path(language) for language in self.languages], target)

    def _write_spec(self) -> Path:
        path = self.directory / "openapi.json"
        if not path.is_file():
            with _replacing(path) as file:
                file.write(json.dumps(self.openapi, indent=2).encode())
        return path

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold the cache folder's exclusive lock, waiting for it without blocking the event loop."""
        with open(self.directory / ".lock", "a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    async def _run_generator(self, language: str, spec: Path, output: Path) -> None:
        command = [
            self.java,
            *JVM_OPTIONS,
            "-jar",
            str(self._jar),
            "generate",
            "--input-spec",
            str(spec),
            "--generator-name",
            GENERATORS[language],
            "--output",
            str(output),
            "--additional-properties=" + ",".join(f"{key}={value}" for key, value in self._options[language].items()),
            *TYPE_MAPPINGS.get(language, ()),
        ]
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as error:
            raise GenerationFailed(f"{language}: cannot run {self.java}: {error}") from error
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), GENERATOR_TIMEOUT_S)
        except TimeoutError:
            raise GenerationFailed(f"{language}: the generator ran over {GENERATOR_TIMEOUT_S:.0f} s") from None
        finally:
            if process.returncode is None:  # cancelled or timed out: leave no java process behind
                process.kill()
                await process.wait()
        text = stdout.decode(errors="replace")
        if process.returncode != 0:
            logger.error("openapi-generator failed for %s (exit code %s):\n%s", language, process.returncode, text)
            raise GenerationFailed(f"{language}: {_reason(text)} (the server log holds the generator's output)")
        logger.info("generated the %s client SDK in %.1f s", language, time.monotonic() - started)


def generator_options(language: str, policy_name: str, version: str) -> dict[str, str]:
    """openapi-generator's `--additional-properties`: the SDK named after the policy, with names
    valid in that language (e.g. mouse_and_cheese_client, policyserver.mouse_and_cheese.client,
    mouse.and.cheese.client), and the choices that let it build with what Debian packages."""
    snake = _snake(policy_name)
    dashed = snake.replace("_", "-")
    package = f"policyserver.{snake}_policy.client" if snake in JAVA_KEYWORDS else f"policyserver.{snake}.client"
    options = {
        "python": {"packageName": f"{snake}_client", "projectName": f"{dashed}-client", "packageVersion": version},
        # `native`: java.net.http and Jackson, so the SDK compiles against Debian's jars (see
        # JAVA_TIME_CLASSES); Jakarta's annotations (one Debian jar), no jackson-databind-nullable.
        "java": {
            "library": "native",
            "useJakartaEe": "true",
            "openApiNullable": "false",
            "invokerPackage": package,
            "apiPackage": f"{package}.api",
            "modelPackage": f"{package}.model",
            "groupId": "policyserver",
            "artifactId": f"{dashed}-client",
            "artifactVersion": version,
        },
        # httr, the generator's default, is Debian's r-cran-httr. An answer other than 2xx stops the
        # call with the server's detail as the error message, instead of coming back as the result.
        "r": {"packageName": f"{snake.replace('_', '.')}.client", "packageVersion": version, "returnExceptionOnFailure": "true"},
    }[language]
    return options | {"hideGenerationTimestamp": "true"}  # the same spec gives the same files


def cache_key(openapi: Mapping[str, Any], options: Mapping[str, Any], generator_version: str | None) -> str:
    """16 hex digits of the sha256 of everything that determines the SDKs: the spec (canonical
    JSON), the options naming them and the generator's version."""
    document = {"openapi": openapi, "options": options, "generator": generator_version}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_clients(openapi: Mapping[str, Any], policy_name: str, languages: Sequence[str], out: Path, *, java: str = "java") -> list[Path]:
    """Blocking, for the command line: generate `languages` and put each in `out` as a folder and a
    zip (`out/python/`, `out/python.zip`, ...). Raises UnknownLanguage, JavaMissing or GenerationFailed."""
    with tempfile.TemporaryDirectory(prefix="policy-server-clients-") as cache:
        sdks = ClientSDKs(openapi, policy_name, Path(cache), languages=languages, java=java)
        asyncio.run(sdks.build())
        out.mkdir(parents=True, exist_ok=True)
        for language in languages:
            archive = out / f"{language}.zip"
            shutil.copyfile(sdks.archive(language), archive)
            shutil.rmtree(out / language, ignore_errors=True)
            _extract(archive, out)
    return [out / language for language in languages]


def _bundled_generator() -> tuple[Path | None, str | None]:
    """The JAR the openapi-generator-cli package ships, and its version (None, None when not installed)."""
    try:
        version = importlib.metadata.version("openapi-generator-cli")
    except importlib.metadata.PackageNotFoundError:
        return None, None
    return Path(str(importlib.resources.files("openapi_generator_cli") / "openapi-generator.jar")), version


def without_java_time(folder: Path) -> None:
    """Take Jackson's java.time module out of a generated Java SDK (see JAVA_TIME_CLASSES), and
    those classes out of the generator's list of the files it wrote.

    Raises GenerationFailed if a source still needs it: the generator's templates have changed."""
    for source in sorted((folder / "src").rglob("*.java")):
        if source.name in JAVA_TIME_CLASSES:
            source.unlink()
        else:
            _drop_lines(source, JAVA_TIME_MODULE)
    for name in JAVA_TIME_CLASSES:
        _drop_lines(folder / ".openapi-generator" / "FILES", name)
    needing = [str(path.relative_to(folder)) for path in (folder / "src").rglob("*.java") if "jsr310" in path.read_text(encoding="utf-8")]
    if needing:
        raise GenerationFailed(f"java: {', '.join(needing)} still needs jackson-datatype-jsr310, which Debian does not package")


def _drop_lines(path: Path, word: str) -> None:
    """Rewrite `path` without its lines that contain `word` (untouched when none does)."""
    text = path.read_text(encoding="utf-8")
    if word in text:
        path.write_text("".join(line for line in text.splitlines(keepends=True) if word not in line), encoding="utf-8")


def _snake(name: str) -> str:
    """A lowercase identifier starting with a letter: 'Mouse-and cheese' → 'mouse_and_cheese'."""
    snake = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return snake if snake[:1].isalpha() else f"policy_{snake}".rstrip("_")


def _reason(output: str) -> str:
    """What went wrong, from the generator's output, in one short line: the spec validator's
    findings when it has some, else the last exception or error line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    findings = [line.removeprefix("-") for line in lines if line.startswith("-attribute")]
    errors = [line for line in lines if "Exception" in line or "ERROR" in line]
    reason = f"invalid OpenAPI spec: {'; '.join(findings)}" if findings else (errors or lines or ["no output"])[-1]
    return reason if len(reason) <= 300 else reason[:297] + "..."


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[BinaryIO]:
    """A temporary file next to `target` that replaces it, atomically, once the block ends without error."""
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)


def _pack(folder: Path, name: str, target: Path) -> None:
    """Zip `folder` as `name/...` into `target`, then remove the folder."""
    try:
        with _replacing(target) as file, zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{name}/{path.relative_to(folder).as_posix()}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _merge(parts: Iterable[Path], target: Path) -> None:
    """One zip holding every entry of `parts` (each already in its language's folder)."""
    with _replacing(target) as file, zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as merged:
        for part in parts:
            with zipfile.ZipFile(part) as source:
                for entry in source.infolist():
                    merged.writestr(entry, source.read(entry), zipfile.ZIP_DEFLATED)


def _extract(archive: Path, out: Path) -> None:
    """Unzip keeping the files' permissions (zipfile drops them; gradlew must stay executable)."""
    with zipfile.ZipFile(archive) as source:
        for entry in source.infolist():
            path = Path(source.extract(entry, out))
            mode = entry.external_attr >> 16
            if mode:
                path.chmod(mode & 0o777)
