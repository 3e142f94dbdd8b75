"""Writes the recipe-search configurations (one TOML per lever set) from the search base."""
from pathlib import Path

BASE = {"federated": {"eval_every": 1000, "eval_max": 64},
        "federated.train_attack": {"norm": "linf", "eps": 0.015, "step": 0.006, "steps": 3, "random_start": True}}
RECIPES = {
    "defaults": {},
    "la-avgm": {"classifier": {"logit_adjust": 1.0}, "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "gn-la-avgm": {"classifier": {"logit_adjust": 1.0, "norm": "group"},
                   "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la": {"classifier": {"logit_adjust": 1.0}},
    "avgm": {"federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "gn": {"classifier": {"norm": "group"}},
    "la-avgm-bs16": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 16},
                     "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la-avgm-bs8": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                    "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la-avgm9-bs8": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                     "federated": {"server_opt": "fedavgm", "server_momentum": 0.9}},
    "la-avgm-bs4": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 4},
                    "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "bs8": {"classifier.optim": {"batch_size": 8}},
    "sgd-la-avgm-bs8": {"classifier": {"logit_adjust": 1.0},
                        "classifier.optim": {"batch_size": 8, "optimizer": "sgd", "lr": 0.03, "momentum": 0.9},
                        "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la-avgm-bs8-keep": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                         "federated": {"server_opt": "fedavgm", "server_momentum": 0.5, "keep_optimizer_state": True}},
    "la-avgm-bs8-gw5": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                        "federated": {"server_opt": "fedavgm", "server_momentum": 0.5, "gate_warmup_rounds": 5}},
    "la-avgm-bs8-bn": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                       "federated": {"server_opt": "fedavgm", "server_momentum": 0.5, "bn_recalibrate": True}},
    "la-avgm-bs8-gb": {"classifier": {"logit_adjust": 1.0, "gate_balance": 0.1}, "classifier.optim": {"batch_size": 8},
                       "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la-prox": {"classifier": {"logit_adjust": 1.0}, "federated": {"proximal_mu": 0.01}},
    "la-avgm-bs8-prox": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                         "federated": {"server_opt": "fedavgm", "server_momentum": 0.5, "proximal_mu": 0.01}},
    "la-avgm-bs8-fedbn": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                          "federated": {"server_opt": "fedavgm", "server_momentum": 0.5, "fedbn": True}},
    "la-avgm-bs8-lr1": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8, "lr": 1e-3},
                        "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la-avgm-bs8-aug": {"classifier": {"logit_adjust": 1.0,
                                       "augment_kwargs": {"scale": 0.1, "translate": 0.05, "noise": 0.02}},
                        "classifier.optim": {"batch_size": 8},
                        "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la2-avgm-bs8": {"classifier": {"logit_adjust": 2.0}, "classifier.optim": {"batch_size": 8},
                     "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la05-avgm-bs8": {"classifier": {"logit_adjust": 0.5}, "classifier.optim": {"batch_size": 8},
                      "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la-avgm7-bs8": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                     "federated": {"server_opt": "fedavgm", "server_momentum": 0.7}},
    "la-adam-bs8": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                    "federated": {"server_opt": "fedadam", "server_lr": 0.01, "server_momentum": 0.9}},
    "la-adam3-bs8": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                     "federated": {"server_opt": "fedadam", "server_lr": 0.03, "server_momentum": 0.9}},
    "la-avgm-bs8-dc1": {"classifier": {"logit_adjust": 1.0, "decorrelation": 1.0}, "classifier.optim": {"batch_size": 8},
                        "federated": {"server_opt": "fedavgm", "server_momentum": 0.5}},
    "la-yogi-bs8": {"classifier": {"logit_adjust": 1.0}, "classifier.optim": {"batch_size": 8},
                    "federated": {"server_opt": "fedyogi", "server_lr": 0.01, "server_momentum": 0.9}},
}


def value(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
    return ("true" if v else "false") if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else repr(v))


def render(recipe: dict) -> str:
    tables: dict[str, dict] = {}
    for src in (BASE, recipe):
        for t, kv in src.items():
            tables.setdefault(t, {}).update(kv)
    order = sorted(tables, key=lambda t: (t.count("."), t))
    out = ['profile = "edge"']
    for t in order:
        out += ["", f"[{t}]"] + [f"{k} = {value(v)}" for k, v in tables[t].items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, r in RECIPES.items():
        (here / f"{name}.toml").write_text(render(r))
