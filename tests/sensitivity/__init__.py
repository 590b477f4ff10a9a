import pytest

# The shared contract assertions live outside a test module; rewrite them for clear failures.
pytest.register_assert_rewrite("tests.sensitivity.contract")
