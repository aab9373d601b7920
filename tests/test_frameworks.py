"""The README's recipes for NorMuon in the trainers our users run, against the real libraries:
train a few steps, save, resume in a fresh trainer, and end exactly where an uninterrupted run
ends. (CPU, one process; no network: models from tiny configs, data made here.)"""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normuon import NorMuon, param_groups

STEPS, STOP = 6, 3


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32),
                         nn.GELU(), nn.Linear(32, 4))


def batches(n=STEPS, size=16):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n * size, 12, generator=gen)
    y = (x[:, :4] * x[:, 4:8]).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- Hugging Face Trainer

class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.ids = torch.randint(1, 64, (n, 16), generator=torch.Generator().manual_seed(2))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_trainer(output_dir, stop_at=None):
    transformers = pytest.importorskip("transformers")

    class StopAt(transformers.TrainerCallback):   # a job that ends early, schedule unchanged
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True


    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=8,
        save_strategy="steps", save_steps=STOP, logging_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    # the recipe: build the groups and the optimizer yourself; the Trainer adds its schedule
    optimizer = NorMuon(param_groups(model), lr=4e-3, weight_decay=0.1)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                optimizers=(optimizer, None), callbacks=[StopAt()])


def test_hugging_face_trainer_resumes_exactly(tmp_path):
    straight = hf_trainer(tmp_path / "straight")
    straight.train()
    stopped = hf_trainer(tmp_path / "stopped", stop_at=STOP)
    stopped.train()
    assert stopped.state.global_step == STOP
    resumed = hf_trainer(tmp_path / "stopped")
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / f"checkpoint-{STOP}"))
    assert resumed.state.global_step == STEPS
    assert_same_parameters(straight.model, resumed.model)


# ----------------------------------------------------------------------------- Lightning

def lightning_module():
    L = pytest.importorskip("lightning")

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = classifier()

        def training_step(self, batch, index):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):   # the recipe
            optimizer = NorMuon(param_groups(self.model, head=self.model[-1]), lr=4e-3,
                                weight_decay=0.1)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return L, Classifier()


def fit(checkpoint_dir, stop_at=None, ckpt_path=None):
    L, module = lightning_module()

    # Lightning resumes a plain DataLoader exactly only from the end of an epoch, and then
    # (2.6.6) serves the next epoch's first batch twice; with one batch per epoch that does
    # not matter, and what is checked is the optimizer's and the schedule's resume
    save = L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1,
                                               save_top_k=-1, save_on_train_epoch_end=True)
    # (the schedule's length is set in configure_optimizers: stopping early leaves it as is)
    trainer = L.Trainer(max_steps=stop_at or STEPS, accelerator="cpu", devices=1, logger=False,
                        callbacks=[save], enable_progress_bar=False,
                        enable_model_summary=False)
    loader = torch.utils.data.DataLoader(batches(1), batch_size=16)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module


def test_lightning_resumes_exactly(tmp_path):
    _, straight = fit(tmp_path / "straight")
    stopped, _ = fit(tmp_path / "stopped", stop_at=STOP)
    assert stopped.global_step == STOP
    checkpoint = next((tmp_path / "stopped").glob(f"*step={STOP}*.ckpt"))
    resumed_trainer, resumed = fit(tmp_path / "resumed", ckpt_path=checkpoint)
    assert resumed_trainer.global_step == STEPS
    assert_same_parameters(straight, resumed)


# ----------------------------------------------------------------------------- Accelerate

def accelerate_run(state_dir, save_at=None, load=False):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = classifier()
    optimizer = NorMuon(param_groups(model, head=model[-1]), lr=4e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    loader = torch.utils.data.DataLoader(batches(), batch_size=16)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    if load:
        accelerator.load_state(state_dir)
        loader = accelerator.skip_first_batches(loader, STOP)
    for step, (x, y) in enumerate(loader, start=STOP + 1 if load else 1):
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step == save_at:
            accelerator.save_state(state_dir)
            break
    return model


def test_accelerate_resumes_exactly(tmp_path):
    straight = accelerate_run(tmp_path / "unused")
    accelerate_run(tmp_path / "state", save_at=STOP)
    resumed = accelerate_run(tmp_path / "state", load=True)
    assert_same_parameters(straight, resumed)
