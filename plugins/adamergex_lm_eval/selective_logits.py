"""Log-likelihoods without full-vocabulary logits: :class:`SelectiveLogitsHFLM`.

lm-eval's :class:`~lm_eval.models.huggingface.HFLM` scores a request ``(context, continuation)``
by running the causal LM on ``context + continuation[:-1]``, taking a log-softmax over the whole
vocabulary at *every* position of every sequence of the padded batch, and then keeping only the
``len(continuation)`` positions that predict continuation tokens. With a large vocabulary ``V``
(128k for Llama 3, 262k for Gemma 3) the output projection and the log-softmax dominate the cost:
``batch x length x V`` logits are computed (and held in memory) where ``sum(len(continuation))``
rows are needed.

:class:`SelectiveLogitsHFLM` computes the same numbers, projecting onto the vocabulary only the
hidden states of the scored positions. For item ``i`` of a right-padded batch whose input (context
plus continuation minus its last token) has ``inplen_i`` tokens, the scored positions are
``inplen_i - contlen_i, ..., inplen_i - 1``; the log-probability of the continuation is

    ``sum_j log_softmax(W h_i[inplen_i - contlen_i + j])[cont_i[j]]``

(with the model's own output head ``W`` and any post-processing it applies, e.g. Gemma's final
logit soft-capping), and the greedy flag is ``argmax`` of the same rows. The positions are passed
to the model's forward as transformers' ``logits_to_keep``:

* ``"mask"``: a boolean ``(batch, length)`` mask (transformers >= 5 flattens the kept hidden
  states to ``(n_scored, hidden)`` before the head), so exactly ``sum(contlen_i)`` rows are
  projected;
* ``"last"``: an integer ``k`` (older transformers): the last ``k`` positions of every row are
  projected, ``k = max_i(length - inplen_i + contlen_i)``, then the scored rows are picked out.

Which one the model supports is decided once, on the first log-likelihood batch, by comparing the
result on a small probe with the model's full forward (to within round-off); a model whose forward
has no ``logits_to_keep`` or ignores it, a prompt-learning PEFT model (virtual tokens), a seq2seq
model, or ``selective_logits=False`` uses HFLM's own path unchanged. Everything else (request
ordering and batching, left truncation, the one-token-continuation logits cache, the cache hook,
``loglikelihood_rolling``, generation) is HFLM's: the batch loop below mirrors
``HFLM._loglikelihood_tokens`` of lm-eval 0.4.x line for line except for the model call.

Results equal HFLM's up to floating-point round-off (the head's matrix product runs on fewer rows,
which may change the summation order of the BLAS kernel).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat
from tqdm import tqdm

logger = logging.getLogger("lm_eval.models.selective_logits")

#: The ways to ask a model for the scored positions only, in order of preference.
MODES = ("mask", "last")

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_UNDECIDED = "undecided"


def parse_bool(value: Any, argument: str) -> bool:
    """A model_arg flag: a bool, or true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{argument}: expected true or false, got {value!r}")


class SelectiveLogitsHFLM(HFLM):
    """HFLM whose log-likelihoods project onto the vocabulary only the positions they score.

    Args:
        selective_logits: ``True`` (default) to use the selective path when the model supports it
            (checked once, see the module docstring), ``False`` for HFLM's path.
        *args, **kwargs: HFLM's arguments.
    """

    def __init__(self, *args: Any, selective_logits: bool | str = True, **kwargs: Any) -> None:
        self._selective_enabled = parse_bool(selective_logits, "selective_logits")
        self._selective_mode: str | None = _UNDECIDED
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ mode selection
    @property
    def selective_mode(self) -> str | None:
        """``"mask"`` or ``"last"`` (see the module docstring), or ``None`` for HFLM's full path.

        Decided on first use and cached.
        """
        if self._selective_mode == _UNDECIDED:
            self._selective_mode = self._choose_selective_mode()
        return self._selective_mode

    def _choose_selective_mode(self) -> str | None:
        reason = None
        if not self._selective_enabled:
            reason = "selective_logits=False"
        elif self.backend != "causal":
            reason = f"backend {self.backend!r} (only causal LMs are supported)"
        else:
            peft_config = getattr(self.model, "active_peft_config", None)
            if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
                reason = "a prompt-learning PEFT model (virtual tokens)"
        if reason is None:
            failures = []
            for mode in MODES:
                problem = self._check_selective_mode(mode)
                if problem is None:
                    logger.info(
                        "Log-likelihoods: computing logits at the scored positions only (logits_to_keep %s).", mode
                    )
                    return mode
                failures.append(f"{mode}: {problem}")
            reason = "; ".join(failures)
        logger.info("Log-likelihoods: full-vocabulary logits at every position (HFLM's path): %s.", reason)
        return None

    def _check_selective_mode(self, mode: str) -> str | None:
        """Compare ``mode`` with the full forward on a small probe; return what is wrong, or ``None``."""
        inps = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]], dtype=torch.long, device=self.device)
        rows = torch.tensor([0, 0, 0, 1]), torch.tensor([3, 4, 5, 4])
        try:
            full = self._model_call(inps)  # [2, 6, vocab]
            expected = full[rows[0].to(full.device), rows[1].to(full.device)]
            got = self._model_call_rows(inps, *rows, mode=mode)
        except Exception as err:  # a model that rejects logits_to_keep, or indexes it differently
            return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"logits of shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
        # Round-off of the model's dtype (the head's product over fewer rows may sum in another order).
        tolerance = max(1e-5, 8 * torch.finfo(self._logits_dtype(got, expected)).eps)
        expected, got = expected.float(), got.float()
        error = (got - expected).abs().max().item()
        if not error <= tolerance * (1.0 + expected.abs().max().item()):
            return f"logits differ from the full forward's by {error:.3g}"
        return None

    @staticmethod
    def _logits_dtype(*tensors: torch.Tensor) -> torch.dtype:
        dtypes = [t.dtype for t in tensors if t.is_floating_point()]
        return min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32

    # ------------------------------------------------------------------ the model call
    def _model_call_rows(
        self, inps: torch.Tensor, batch_index: torch.Tensor, position: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """Logits ``[n, vocab]`` at rows ``(batch_index[k], position[k])`` of ``inps`` ``[batch, length]``.

        The rows must be in row-major order (by batch index, then position) without repeats.
        Equal to ``self._model_call(inps)[batch_index, position]`` up to round-off.
        """
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            if mode == "mask":
                keep = torch.zeros(inps.shape, dtype=torch.bool, device=inps.device)
                keep[batch_index.to(inps.device), position.to(inps.device)] = True
                return self.model(inps, logits_to_keep=keep).logits
            if mode == "last":
                length = inps.shape[1]
                keep = length - int(position.min())
                logits = self.model(inps, logits_to_keep=keep).logits  # [batch, keep, vocab]
                if logits.shape[1] != keep:
                    raise RuntimeError(f"the model returned {logits.shape[1]} positions for logits_to_keep={keep}")
                index = (batch_index.to(logits.device), (position - (length - keep)).to(logits.device))
                return logits[index]
        raise ValueError(f"unknown selective-logits mode {mode!r}")

    # ------------------------------------------------------------------ HFLM override
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """HFLM's ``_loglikelihood_tokens`` with logits at the scored positions only (causal LMs).

        Same request order, batches, truncation, logits cache and cache hook as HFLM; falls back
        to HFLM's method when :attr:`selective_mode` is ``None``.
        """
        mode = self.selective_mode
        if mode is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

        def _collate(req):  # as HFLM: longest first, so a batch's first item sets its padded length
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req):  # as HFLM: requests sharing context + continuation[:-1]
            return req[-2] + req[-1][:-1]

        re_ord = Collator(
            requests,
            sort_fn=_collate,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_lookup_one_token_cont,
        )
        n_reordered_requests = len(re_ord)
        batch_size = self.batch_size if self.batch_size != "auto" else override_bs if override_bs is not None else 0
        batch_fn = (
            self._batch_scheduler
            if self.batch_size == "auto" and n_reordered_requests > 0 and not override_bs
            else None
        )
        if batch_fn is not None:
            self.batch_sizes = {}  # as HFLM: detect the batch size again for these requests
        chunks = re_ord.get_batched(n=batch_size, batch_fn=batch_fn)
        pbar = tqdm(
            total=len(requests), disable=(disable_tqdm or (self.rank != 0)), desc="Running loglikelihood requests"
        )
        res = []
        for chunk in chunks:
            inps, inplens, cont_toks_list = [], [], []
            for _, context_enc, continuation_enc in chunk:
                assert len(context_enc) > 0
                assert len(continuation_enc) > 0
                assert len(continuation_enc) <= self.max_length
                total_length = len(context_enc) + len(continuation_enc)
                if total_length > self.max_length + 1:
                    logger.warning(
                        "Combined length of context (%d) and continuation (%d) exceeds model's maximum length (%d). "
                        "Truncating %d tokens from the left.",
                        len(context_enc),
                        len(continuation_enc),
                        self.max_length,
                        total_length - self.max_length + 1,
                    )
                inp = torch.tensor(
                    (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1],
                    dtype=torch.long,
                    device=self.device,
                )
                inps.append(inp)
                inplens.append(inp.shape[0])
                cont_toks_list.append(continuation_enc)
            padding_len_inp = max(inplens)
            batched_inps = pad_and_concat(padding_len_inp, inps, padding_side="right")  # [batch, padding_len_inp]

            # The scored positions: inplen - contlen, ..., inplen - 1 of each item, in row-major order.
            contlens = [len(cont) for cont in cont_toks_list]
            batch_index = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor(contlens))
            position = torch.cat(
                [torch.arange(inplen - contlen, inplen) for inplen, contlen in zip(inplens, contlens, strict=True)]
            )
            multi_logits = F.log_softmax(
                self._model_call_rows(batched_inps, batch_index, position, mode=mode),
                dim=-1,
                dtype=self.softmax_dtype,
            )  # [sum(contlens), vocab]
            multi_greedy = multi_logits.argmax(dim=-1).split(contlens)  # per item: [contlen]

            for (request_str, ctx_tokens, _), logits, greedy_tokens, cont_toks in zip(
                chunk, multi_logits.split(contlens), multi_greedy, cont_toks_list, strict=True
            ):
                logits, greedy_tokens = logits.unsqueeze(0), greedy_tokens.unsqueeze(0)  # [1, contlen, (vocab)]
                # As HFLM: expand one-token-continuation cache hits (same context + continuation[:-1]).
                for request_str, cont_toks, logits in re_ord.get_cache(  # noqa: B020, PLW2901
                    req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks, logits=logits
                ):
                    cont_toks = torch.tensor(cont_toks, dtype=torch.long, device=logits.device).unsqueeze(0)
                    max_equal = (greedy_tokens[:, -cont_toks.shape[1] :] == cont_toks).all()
                    logits = torch.gather(logits, 2, cont_toks.unsqueeze(-1)).squeeze(-1)  # [1, contlen]
                    answer = (float(logits.sum()), bool(max_equal))
                    res.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)
