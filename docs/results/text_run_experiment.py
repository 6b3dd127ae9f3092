"""kd-lightning experiment with runner._predict reading the batch by the model's input_keys
(the upstream _predict reads batch["image"] only; the fix is proposed to the lead)."""
import sys

import torch

import kd_lightning.experiment.runner as runner
from kd_lightning.modules.inputs import model_inputs


@torch.inference_mode()
def _predict(model, dm):
    model.eval()
    device = next(model.parameters()).device
    net, role = (model.student, "student") if hasattr(model, "student") else (model.model, "model")
    probs, labels = [], []
    for batch in dm.test_dataloader():
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        probs.append(model(*model_inputs(net, batch, role)).float().softmax(dim=1).cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(probs), torch.cat(labels)


runner._predict = _predict
runner.main(sys.argv[1:])
