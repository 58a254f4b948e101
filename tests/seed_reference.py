"""The seed's model and loss (../shared/seed/000_5c7377212c075ae0.txt), transcribed line for
line as the independent reference the tests compare vae_exp against. Not used by vae_exp."""

import torch
import torch.nn.functional as F
from torch import nn


class SeedVAE(nn.Module):
    def __init__(self, img_size, latent_dim):
        super().__init__()
        self.in_channel, self.img_h, self.img_w = img_size
        self.h = self.img_h // 32
        self.w = self.img_w // 32
        hw = self.h * self.w
        self.latent_dim = latent_dim
        self.hidden_dims = [32, 64, 128, 256, 512]
        layers = []
        for hidden_dim in self.hidden_dims:
            layers += [
                nn.Conv2d(self.in_channel, hidden_dim, 3, 2, 1),
                nn.BatchNorm2d(hidden_dim),
                nn.LeakyReLU(),
            ]
            self.in_channel = hidden_dim
        self.encoder = nn.Sequential(*layers)
        self.fc_mu = nn.Linear(self.hidden_dims[-1] * hw, self.latent_dim)
        self.fc_var = nn.Linear(self.hidden_dims[-1] * hw, self.latent_dim)
        layers = []
        self.decoder_input = nn.Linear(self.latent_dim, self.hidden_dims[-1] * hw)
        self.hidden_dims.reverse()
        for i in range(len(self.hidden_dims) - 1):
            layers += [
                nn.ConvTranspose2d(self.hidden_dims[i], self.hidden_dims[i + 1], 3, 2, 1, 1),
                nn.BatchNorm2d(self.hidden_dims[i + 1]),
                nn.LeakyReLU(),
            ]
        layers += [
            nn.ConvTranspose2d(self.hidden_dims[-1], self.hidden_dims[-1], 3, 2, 1, 1),
            nn.BatchNorm2d(self.hidden_dims[-1]),
            nn.LeakyReLU(),
            nn.Conv2d(self.hidden_dims[-1], img_size[0], 3, 1, 1),
            nn.Tanh(),
        ]
        self.decoder = nn.Sequential(*layers)

    def encode(self, x):
        result = self.encoder(x)
        result = torch.flatten(result, 1)
        mu = self.fc_mu(result)
        log_var = self.fc_var(result)
        return [mu, log_var]

    def decode(self, z):
        y = self.decoder_input(z).view(-1, self.hidden_dims[0], self.h, self.w)
        y = self.decoder(y)
        return y

    def reparameterize(self, mu, log_var):
        std = torch.exp(0.5 * log_var)
        eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x):
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var)
        y = self.decode(z)
        return [y, x, mu, log_var]


def seed_loss(y, x, mu, log_var, w=0.00025):
    recons_loss = F.mse_loss(y, x)
    kld_loss = torch.mean(0.5 * torch.sum(mu**2 + torch.exp(log_var) - log_var - 1, 1), 0)
    return recons_loss + w * kld_loss
