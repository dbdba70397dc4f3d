"""Services besides OpenAI and Anthropic, end to end: OpenAI-compatible APIs the owner declares in config.yaml, and
Azure OpenAI against a fake Azure that the openai SDK's Azure client accepts."""

import json

import httpx
import openai
import pytest

from llmproxy.services.azure import API_VERSION
from tests.conftest import CANARY, proxy_env
from tests.fakes.azure import FakeAzure
from tests.harness import ProxyProcess, wait_until

pytestmark = pytest.mark.e2e

LOCAL_KEYS = [f"local-canary-{CANARY}-one-429", f"local-canary-{CANARY}-two"]  # the first always rate-limited


def declared(fake, **fields) -> str:
    """A SERVICES setting declaring one compatible service, `localllm`, at the fake upstream."""
    return json.dumps([{"name": "localllm", "url": f"{fake.url}/v1", **fields}])


@pytest.fixture
def compatible(fake, start_proxy):
    return start_proxy(
        proxy_env(
            fake,
            SERVICES=declared(
                fake,
                title="Local LLM",
                families=["small=tiny-*", "local=*"],
                models=["tiny-1", "big-2"],
                endpoints=["chat_completions", "embeddings"],
            ),
            LOCALLLM_KEY=",".join(LOCAL_KEYS),
        )
    )


def test_a_declared_service_is_served_with_its_own_keys_under_its_base_url(fake, compatible):
    client = openai.OpenAI(base_url=f"{compatible.url}/proxy/localllm/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="tiny-1", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    stream = client.chat.completions.create(model="big-2", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    sent = [request for request in fake.requests if request.path == "/v1/chat/completions"]
    # Each request tried the rate-limited key (the pool does not know it yet) or the good one; all ended on the good.
    assert {request.key for request in sent} <= set(LOCAL_KEYS) and sent[-1].key == LOCAL_KEYS[1]
    compatible.wait_for_log('"family": "local"')  # a stream's line is written as it ends, after the client's read
    log = compatible.log()
    assert '"route": "localllm.chat_completions"' in log and '"family": "small"' in log and '"family": "local"' in log
    assert all(key not in log for key in LOCAL_KEYS)


def test_a_declared_service_shows_on_the_status_page_and_lists_its_models(compatible):
    status = httpx.get(f"{compatible.url}/status").json()
    assert status["localllm"]["keys"]["total"] == 2 and status["localllmKeys"] == 2
    assert status["endpoints"]["localllm"].endswith("/proxy/localllm/v1")
    assert {"small", "local"} <= set(status["families"])
    page = httpx.get(f"{compatible.url}/").text
    assert "Local LLM" in page
    models = httpx.get(f"{compatible.url}/proxy/localllm/v1/models").json()
    assert [model["id"] for model in models["data"]] == ["tiny-1", "big-2"]


def test_only_the_declared_endpoints_of_a_service_exist(fake, compatible):
    body = {"model": "tiny-1", "input": "x"}
    assert httpx.post(f"{compatible.url}/proxy/localllm/v1/embeddings", json=body).status_code == 200
    refused = httpx.post(f"{compatible.url}/proxy/localllm/v1/completions", json={"model": "tiny-1", "prompt": "x"})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    refused = httpx.post(f"{compatible.url}/proxy/localllm/v1/messages", json={"model": "tiny-1"})
    assert refused.status_code == 404
    assert [request.path for request in fake.requests] == ["/v1/embeddings"] * len(fake.requests)


@pytest.mark.parametrize(
    "services, sentence",
    [
        ('[{"name": "Local", "url": "http://127.0.0.1:1/v1"}]', "SERVICES entry 1: the name 'Local' must be"),
        ('[{"name": "openai", "url": "http://127.0.0.1:1/v1"}]', "SERVICES entry 1: the name 'openai' is taken"),
        (
            '[{"name": "a", "url": "http://x:1/v1"}, {"name": "a", "url": "http://x:2/v1"}]',
            "SERVICES entry 2: the name 'a' is taken",
        ),
        ('[{"name": "a", "url": "ftp://x/v1"}]', "SERVICES entry 1: the url must be an http:// or https://"),
        ('[{"name": "a", "url": "http://x/v1", "key": "k"}]', "SERVICES entry 1 has a field this proxy does not know"),
        ('[{"name": "a", "url": "http://x/v1", "endpoints": ["files"]}]', "endpoints may be chat_completions"),
        ('[{"name": "a", "url": "http://x/v1", "families": ["nope"]}]', "A_MODEL_FAMILIES entries look like"),
        ('{"name": "a"}', "SERVICES must be a list of services"),
        ("[{", "SERVICES must be a YAML or JSON list"),
    ],
)
def test_a_malformed_service_stops_start_up_with_one_sentence(services, sentence):
    process = ProxyProcess({"SERVICES": services})
    assert process.run_to_exit() != 0
    assert sentence in process.log() and "Traceback" not in process.log()


def test_credentials_in_a_service_url_are_refused_without_being_shown():
    process = ProxyProcess({"SERVICES": '[{"name": "my-llm", "url": "ftp://user:hunter2@x/v1"}]'})
    assert process.run_to_exit() != 0
    log = process.log()
    assert "put the key in MY_LLM_KEY" in log and "hunter2" not in log


# -- Azure OpenAI ------------------------------------------------------------------------------------------------
AZURE_KEY = f"azure-canary-{CANARY}"


@pytest.fixture(scope="module")
def azure_server(fake):
    upstream = FakeAzure(fake.url).start_in_thread()
    yield upstream
    upstream.stop_in_thread()


@pytest.fixture
def azure(azure_server):
    """The fake Azure, with no deployments and no calls yet."""
    azure_server.reset()
    return azure_server


def contoso(azure: FakeAzure, key: str = AZURE_KEY) -> list[str]:
    """Resource `contoso`: a gpt-4o deployment and an embedding deployment, on one key (Azure's keys are a
    resource's)."""
    return [
        azure.add_deployment("contoso", "chat-4o", "gpt-4o", key),
        azure.add_deployment("contoso", "embed-small", "text-embedding-3-small", key),
    ]


def test_the_fake_azure_answers_the_openai_sdks_azure_client_as_azure_does(azure):
    contoso(azure)
    client = openai.AzureOpenAI(
        azure_endpoint=f"{azure.url}/contoso", api_key=AZURE_KEY, api_version=API_VERSION, max_retries=0
    )
    answer = client.chat.completions.create(model="chat-4o", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    assert client.embeddings.create(model="embed-small", input="hi").data[0].embedding
    call = azure.calls[-1]
    assert call.path == "/contoso/openai/deployments/embed-small/embeddings" and call.headers["api-key"] == AZURE_KEY
    wrong = openai.AzureOpenAI(azure_endpoint=f"{azure.url}/contoso", api_key="nope", api_version=API_VERSION)
    with pytest.raises(openai.AuthenticationError):
        wrong.with_options(max_retries=0).chat.completions.create(model="chat-4o", messages=[])
    with pytest.raises(openai.NotFoundError, match="deployment for this resource does not exist"):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])


def test_azure_deployments_serve_their_models_families_through_the_proxy(fake, azure, start_proxy):
    credentials = contoso(azure)
    proxy = start_proxy(
        proxy_env(fake, AZURE_CREDENTIALS=",".join(credentials), AZURE_UPSTREAM_URL=azure.url, CHECK_KEYS="true")
    )
    # The checker looks each deployment up and learns its model: then each family has exactly its deployment.
    wait_until(lambda: set(httpx.get(f"{proxy.url}/status").json()["families"]) >= {"azure-gpt4o", "azure-embeddings"})
    wait_until(lambda: "azure-turbo" not in httpx.get(f"{proxy.url}/status").json()["families"])
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/azure/openai/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert client.embeddings.create(model="text-embedding-3-small", input="hi").data[0].embedding
    inference = [call for call in azure.calls if not call.path.endswith(("chat-4o", "embed-small"))]
    assert [call.path for call in inference[-3:]] == [
        "/contoso/openai/deployments/chat-4o/chat/completions",
        "/contoso/openai/deployments/chat-4o/chat/completions",
        "/contoso/openai/deployments/embed-small/embeddings",
    ]
    assert {call.query["api-version"] for call in inference} == {API_VERSION}
    assert {call.headers["api-key"] for call in azure.calls} == {AZURE_KEY}
    assert all("authorization" not in {name.lower() for name in call.headers} for call in azure.calls)
    assert AZURE_KEY not in proxy.log() and CANARY not in answer.model_dump_json()
    status = httpx.get(f"{proxy.url}/status").json()
    assert status["azure"]["keys"]["total"] == 2 and status["endpoints"]["azure"].endswith("/proxy/azure/openai/v1")


def test_a_rate_limited_azure_deployment_gives_way_to_another_of_the_same_model(fake, azure, start_proxy):
    limited = azure.add_deployment("fabrikam", "gpt4o-east", "gpt-4o", f"azure-canary-{CANARY}-429")
    working = azure.add_deployment("northwind", "gpt4o-west", "gpt-4o", AZURE_KEY)
    proxy = start_proxy(proxy_env(fake, AZURE_CREDENTIALS=f"{limited},{working}", AZURE_UPSTREAM_URL=azure.url))
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/azure/openai/v1", api_key="unused", max_retries=0)
    for _ in range(3):
        assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
    assert azure.calls[-1].path == "/northwind/openai/deployments/gpt4o-west/chat/completions"


@pytest.mark.parametrize(
    "credentials", ["contoso:chat-4o", "contoso::key", "con/toso:chat:key", "contoso:chat?x=1:key", ":chat:key"]
)
def test_a_malformed_azure_credential_stops_start_up_without_showing_it(credentials):
    process = ProxyProcess({"AZURE_CREDENTIALS": f"ok:deployment:{AZURE_KEY},{credentials}"})
    assert process.run_to_exit() != 0
    log = process.log()
    assert "AZURE_CREDENTIALS entry 2 must look like resource:deployment:key" in log
    assert AZURE_KEY not in log and "Traceback" not in log
