"""What `gpt2-onnx serve` reports at /metrics, in Prometheus's text format: counters of requests
and tokens, gauges of the engine's queue and slots, histograms of time to first token and
inter-token latency. Written here (the format is a few lines) rather than with another package."""

from __future__ import annotations

import bisect


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count, written as text."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts, self.sum, self.count = [0] * (len(buckets) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]


class Metrics:
    """What /metrics reports. Updated from the event loop's thread only, so no lock."""

    def __init__(self):
        self.requests: dict[int, int] = {}  # /v1/completions responses by HTTP status
        self.prompt_tokens = self.completion_tokens = 0
        self.disconnects = 0  # clients gone before their response was complete (their choices cancelled)
        self.read_timeouts = 0  # connections closed because a request was not whole within --read-timeout
        self.ttft = Histogram("gpt2onnx_time_to_first_token_seconds", "From submission to a choice's first token.",
                              (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))  # fmt: skip
        self.itl = Histogram("gpt2onnx_inter_token_latency_seconds", "Between a choice's consecutive tokens.",
                             (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))  # fmt: skip

    def request(self, status: int) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1

    def choice_done(self, submitted_at: float, token_times: list[float], new_tokens: int) -> None:
        self.completion_tokens += new_tokens
        if token_times:
            self.ttft.observe(max(token_times[0] - submitted_at, 0.0))
        for before, after in zip(token_times, token_times[1:]):
            self.itl.observe(after - before)

    def text(self, stats: dict) -> str:
        lines = ["# HELP gpt2onnx_requests_total /v1/completions requests by HTTP status.",
                 "# TYPE gpt2onnx_requests_total counter"]  # fmt: skip
        lines += [
            f'gpt2onnx_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.requests.items())
        ]
        for name, value, kind, help_text in [
            ("prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens of submitted choices."),
            ("generation_tokens_total", self.completion_tokens, "counter", "Tokens generated."),
            (
                "client_disconnects_total",
                self.disconnects,
                "counter",
                "Clients gone before their response ended.",
            ),
            (
                "read_timeouts_total",
                self.read_timeouts,
                "counter",
                "Connections closed: a request not whole within --read-timeout.",
            ),
            ("queue_depth", stats["queue_depth"], "gauge", "Requests waiting for a slot."),
            ("active_slots", stats["active_slots"], "gauge", "Slots running a request."),
            ("max_batch", stats["max_batch"], "gauge", "Slots in all (--max-batch)."),
            ("max_queue", stats["max_queue"], "gauge", "Requests that may wait (--max-queue)."),
            (
                "draft_tokens_proposed_total",
                stats.get("draft_tokens_proposed", 0),
                "counter",
                "Speculative decoding: tokens proposed (prompt_lookup).",
            ),
            (
                "draft_tokens_accepted_total",
                stats.get("draft_tokens_accepted", 0),
                "counter",
                "Speculative decoding: proposed tokens the model agreed with.",
            ),
        ]:
            lines += [f"# HELP gpt2onnx_{name} {help_text}", f"# TYPE gpt2onnx_{name} {kind}",
                      f"gpt2onnx_{name} {value}"]  # fmt: skip
        return "\n".join(lines + self.ttft.lines() + self.itl.lines()) + "\n"
