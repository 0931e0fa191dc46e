"""Prompts from documents, and (prompt, response) token ids for training.

The prompt uses the tokenizer's chat template when it has one (`prompt.style=auto`), otherwise a
plain `instruction / document / Summary:` template for base models. The response is the summary's
tokens followed by EOS, so generation learns to stop. Documents are truncated to
`prompt.max_document_tokens` and the number of truncated examples is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from lastmile.config import PromptConfig
from lastmile.data.records import Example


@dataclass(frozen=True)
class TokenizedExample:
    id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # summary tokens + EOS; empty when built for generation only


@dataclass(frozen=True)
class TokenizeReport:
    examples: int
    truncated_documents: int
    truncated_summaries: int

    def describe(self) -> str:
        return (
            f"{self.examples} examples; {self.truncated_documents} documents truncated to the token budget, "
            f"{self.truncated_summaries} summaries truncated"
        )


class PromptBuilder:
    def __init__(self, tokenizer, cfg: PromptConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.use_chat = cfg.style == "chat" or (cfg.style == "auto" and getattr(tokenizer, "chat_template", None))

    def prompt_text(self, document: str) -> tuple[str, bool]:
        """The prompt for a document, and whether the document was truncated."""
        doc_ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        truncated = len(doc_ids) > self.cfg.max_document_tokens
        if truncated:
            document = self.tokenizer.decode(doc_ids[: self.cfg.max_document_tokens]).rstrip() + " ..."
        if self.use_chat:
            messages = [{"role": "user", "content": f"{self.cfg.instruction}\n\n{document}"}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), truncated
        return f"{self.cfg.instruction}\n\n{document}\n\nSummary:", truncated

    def prompt_ids(self, document: str) -> tuple[list[int], bool]:
        text, truncated = self.prompt_text(document)
        return self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"], truncated

    def response_ids(self, summary: str) -> tuple[list[int], bool]:
        text = summary if self.use_chat else " " + summary
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated = len(ids) > self.cfg.max_summary_tokens
        return ids[: self.cfg.max_summary_tokens] + [self.tokenizer.eos_token_id], truncated

    def tokenize(self, examples: list[Example], *, with_response: bool = True) -> tuple[list[TokenizedExample], TokenizeReport]:
        out, doc_cut, sum_cut = [], 0, 0
        for ex in examples:
            prompt, d = self.prompt_ids(ex.document)
            response, s = self.response_ids(ex.summary) if with_response else ([], False)
            doc_cut += d
            sum_cut += s
            out.append(TokenizedExample(ex.id, tuple(prompt), tuple(response)))
        return out, TokenizeReport(len(out), doc_cut, sum_cut)
