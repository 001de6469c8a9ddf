import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded once per test session."""
    from featureatlas.activation_store.models import load_model

    return load_model("smollm2-135m")
