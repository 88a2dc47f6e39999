"""Reference: BYOL in PyTorch on a `loader synth` dataset, to see what a CPU budget can learn.

A quarter-width ResNet-18 with the small stem (3x3 conv, no max-pool), 32 px views with the
byol-small augmentations (torchvision), projector/predictor 512 -> 128, EMA target (0.99, cosine
to 1), AdamW with cosine decay, two threads: the settings of tools/demo.sh. Prints the weighted kNN
top-1 (k 20, temperature 0.07, features of the whole image resized to 32 px) of the random
backbone and four times during training.

Usage: python tools/byol_torch_reference.py SYNTH_DIR STEPS LR_PER_256 [BATCH]
  SYNTH_DIR holds train/<class>/*.png and val/<class>/*.png (`loader synth --out SYNTH_DIR`).
"""
import sys, glob, os, math, copy, time
import torch, torch.nn as nn, torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
torch.set_num_threads(2); torch.manual_seed(0)
root = sys.argv[1]; steps = int(sys.argv[2]); lr = float(sys.argv[3]); B = int(sys.argv[4]) if len(sys.argv) > 4 else 64
def load(split):
    X, Y = [], []
    for ci, c in enumerate(sorted(os.listdir(f"{root}/{split}"))):
        for f in sorted(glob.glob(f"{root}/{split}/{c}/*")):
            X.append(Image.open(f).convert("RGB")); Y.append(ci)
    return X, torch.tensor(Y)
Xt, Yt = load("train"); Xv, Yv = load("val")
norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
def aug(sol):
    return T.Compose([T.RandomResizedCrop(32, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2), T.RandomSolarize(128, p=sol), T.ToTensor(), norm])
a1, a2 = aug(0.0), aug(0.2)
plain = T.Compose([T.Resize(32), T.ToTensor(), norm])
class Block(nn.Module):
    def __init__(s, i, o, st):
        super().__init__()
        s.c1 = nn.Conv2d(i, o, 3, st, 1, bias=False); s.b1 = nn.BatchNorm2d(o)
        s.c2 = nn.Conv2d(o, o, 3, 1, 1, bias=False); s.b2 = nn.BatchNorm2d(o)
        s.d = None if st == 1 and i == o else nn.Sequential(nn.Conv2d(i, o, 1, st, bias=False), nn.BatchNorm2d(o))
    def forward(s, x):
        y = F.relu(s.b1(s.c1(x))); y = s.b2(s.c2(y))
        return F.relu(y + (x if s.d is None else s.d(x)))
class Net(nn.Module):
    def __init__(s, w=16):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        L = []; c = w
        for i, o in enumerate([w, 2*w, 4*w, 8*w]):
            L += [Block(c, o, 1 if i == 0 else 2), Block(o, o, 1)]; c = o
        s.layers = nn.Sequential(*L); s.dim = c
    def forward(s, x): return s.layers(s.stem(x)).mean((2, 3))
def mlp(i, h, o): return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))
net = Net(); proj = mlp(128, 512, 128); pred = mlp(128, 512, 128)
tnet, tproj = copy.deepcopy(net), copy.deepcopy(proj)
params = list(net.parameters()) + list(proj.parameters()) + list(pred.parameters())
opt = torch.optim.AdamW(params, lr=lr * B / 256, weight_decay=1e-4)
def knn():
    net.eval()
    with torch.no_grad():
        ft = F.normalize(net(torch.stack([plain(x) for x in Xt])), dim=1)
        fv = F.normalize(net(torch.stack([plain(x) for x in Xv])), dim=1)
    net.train()
    s, i = (fv @ ft.T).topk(20, dim=1)
    votes = torch.zeros(len(Xv), 10).scatter_add_(1, Yt[i], (s / 0.07).exp())
    return (votes.argmax(1) == Yv).float().mean().item() * 100
print("random kNN", knn())
g = torch.Generator().manual_seed(0); t0 = time.time()
for step in range(steps):
    idx = torch.randint(len(Xt), (B,), generator=g)
    v1 = torch.stack([a1(Xt[i]) for i in idx]); v2 = torch.stack([a2(Xt[i]) for i in idx])
    for gr in opt.param_groups: gr["lr"] = lr * B / 256 * 0.5 * (1 + math.cos(math.pi * step / steps))
    o = pred(proj(net(torch.cat([v1, v2]))))
    with torch.no_grad(): t = tproj(tnet(torch.cat([v2, v1])))
    loss = (2 - 2 * F.cosine_similarity(o, t, dim=1)).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    m = 1 - (1 - 0.99) * (math.cos(math.pi * step / steps) + 1) / 2
    with torch.no_grad():
        for a, b in zip(list(net.parameters()) + list(proj.parameters()), list(tnet.parameters()) + list(tproj.parameters())): b.mul_(m).add_((1 - m) * a)
        for a, b in zip(list(net.buffers()) + list(proj.buffers()), list(tnet.buffers()) + list(tproj.buffers())): b.copy_(a)
    if (step + 1) % max(1, steps // 4) == 0: print(step + 1, round(loss.item(), 3), "kNN", knn(), f"{time.time()-t0:.0f}s", flush=True)
