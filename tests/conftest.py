import pytest

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
