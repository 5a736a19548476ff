"""Every bad input gets an error that names the argument and what was expected."""

import pytest
import torch

import distillm_ext


def logits(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CASES = {
    "shape mismatch": (lambda: (logits(2, 3, 10), logits(2, 4, 10)), {}, RuntimeError,
                       "teacher_logits must have the same shape as student_logits"),
    "vocabulary mismatch": (lambda: (logits(2, 10), logits(2, 11)), {}, RuntimeError,
                            "vocabulary size"),
    "integer student": (lambda: (torch.ones(2, 10, dtype=torch.long), logits(2, 10)), {}, RuntimeError,
                        "student_logits must be float32, float16 or bfloat16"),
    "float64 teacher": (lambda: (logits(2, 10), logits(2, 10, dtype=torch.float64)), {}, RuntimeError,
                        "teacher_logits must be float32, float16 or bfloat16"),
    "labels wrong shape": (lambda: (logits(2, 3, 10), logits(2, 3, 10), torch.zeros(2, 4, dtype=torch.long)),
                           {}, RuntimeError, "labels must have the leading shape"),
    "labels wrong dtype": (lambda: (logits(2, 10), logits(2, 10), torch.zeros(2)), {}, RuntimeError,
                           "labels must be an integer tensor"),
    "labels bool": (lambda: (logits(2, 10), logits(2, 10), torch.zeros(2, dtype=torch.bool)), {}, RuntimeError,
                    "labels must be an integer tensor"),
    "last dim not contiguous": (lambda: (logits(10, 2).t(), logits(2, 10)), {}, RuntimeError,
                                "student_logits must be contiguous in its last"),
    "teacher last dim not contiguous": (lambda: (logits(2, 10), logits(10, 2).t()), {}, RuntimeError,
                                        "teacher_logits must be contiguous in its last"),
    "alpha negative": (lambda: (logits(2, 10), logits(2, 10)), {"alpha": -0.1}, ValueError,
                       r"alpha must be in \[0, 1\)"),
    "alpha one": (lambda: (logits(2, 10), logits(2, 10)), {"alpha": 1.0}, ValueError, r"alpha must be in \[0, 1\)"),
    "alpha nan": (lambda: (logits(2, 10), logits(2, 10)), {"alpha": float("nan")}, ValueError, "alpha"),
    "temperature zero": (lambda: (logits(2, 10), logits(2, 10)), {"temperature": 0.0}, ValueError,
                         "temperature must be a positive"),
    "temperature negative": (lambda: (logits(2, 10), logits(2, 10)), {"temperature": -1.0}, ValueError,
                             "temperature must be a positive"),
    "unknown reduction": (lambda: (logits(2, 10), logits(2, 10)), {"reduction": "avg"}, ValueError,
                          "reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    "zero-sized vocabulary": (lambda: (logits(2, 0), logits(2, 0)), {}, RuntimeError,
                              "vocabulary .last. dimension of the logits is empty"),
    "scalar logits": (lambda: (torch.tensor(1.0), torch.tensor(1.0)), {}, RuntimeError,
                      "must have at least one dimension"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_a_clear_error(case):
    make_args, kwargs, error, message = CASES[case]
    with pytest.raises(error, match=message):
        distillm_ext.skew_kl(*make_args(), **kwargs)


def test_different_devices_is_a_clear_error():
    with pytest.raises(RuntimeError, match="must be on the same device"):
        distillm_ext.skew_kl(logits(2, 10), logits(2, 10).to("meta"))


def test_labels_on_another_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="labels must be on the device"):
        distillm_ext.skew_kl(logits(2, 10).to("meta"), logits(2, 10).to("meta"), torch.zeros(2, dtype=torch.long))
