"""The `PeftModelFor*` task classes: explicit forward signatures (Trainer reads them) and task heads.

Signatures match HF PEFT so transformers' `Trainer` keeps the right dataset columns.
"""

from __future__ import annotations

from typing import Any

from .peft_model import PeftModel
from .types import TaskType


def _call(model: PeftModel, named: dict[str, Any], kwargs: dict[str, Any]):
    """Forward `named` (dropping unset optionals) and `kwargs` to the base model."""
    args = {k: v for k, v in named.items() if v is not None}
    return PeftModel.forward(model, **args, **kwargs)


def _labels_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None,
                    task_ids=None, **kwargs):
    """Forward of the classification and causal-LM task classes (HF PEFT's signature)."""
    named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                 labels=labels, output_attentions=output_attentions,
                 output_hidden_states=output_hidden_states, return_dict=return_dict, task_ids=task_ids)
    return _call(self, named, kwargs)


class PeftModelForSequenceClassification(PeftModel):
    task_modules_to_save = ("classifier", "score")
    forward = _labels_forward


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    task_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    task_modules_to_save = ("qa_outputs",)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        named = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, inputs_embeds=inputs_embeds, start_positions=start_positions,
                     end_positions=end_positions, output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states, return_dict=return_dict, task_ids=task_ids)
        return _call(self, named, kwargs)


class PeftModelForCausalLM(PeftModel):
    forward = _labels_forward

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                     decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                     decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict, task_ids=task_ids)
        return _call(self, named, kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict, task_ids=task_ids)
        return _call(self, named, kwargs)


TASK_CLASSES: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
