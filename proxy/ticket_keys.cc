#include "proxy/ticket_keys.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstring>
#include <map>

namespace custody::proxy {
namespace {

// ExIndex is the SSL_CTX ex_data slot that points to a context's TicketKeys.
int ExIndex() {
  static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

int TicketKeyCallback(SSL* ssl, unsigned char* name, unsigned char* iv, EVP_CIPHER_CTX* cipher,
                      EVP_MAC_CTX* mac, int enc) {
  auto* keys = static_cast<TicketKeys*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ExIndex()));
  return keys == nullptr ? -1 : keys->Use(name, iv, cipher, mac, enc);
}

}  // namespace

std::shared_ptr<TicketKeys> TicketKeys::ForListener(const std::string& name) {
  static std::mutex mu;
  static auto* rings = new std::map<std::string, std::shared_ptr<TicketKeys>>();
  std::lock_guard<std::mutex> lock(mu);
  std::shared_ptr<TicketKeys>& ring = (*rings)[name];
  if (ring == nullptr) {
    ring = std::make_shared<TicketKeys>();
  }
  return ring;
}

TicketKeys::TicketKeys(std::function<absl::Time()> now) : now_(std::move(now)) {}

TicketKeys::~TicketKeys() {
  for (Key& k : keys_) {
    OPENSSL_cleanse(&k, sizeof(k));
  }
}

void TicketKeys::Install(SSL_CTX* ctx) {
  SSL_CTX_set_ex_data(ctx, ExIndex(), this);
  SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, &TicketKeyCallback);
  SSL_CTX_set_timeout(ctx, static_cast<long>(absl::ToInt64Seconds(kDecryptFor)));
}

size_t TicketKeys::Held() {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_.size();
}

const TicketKeys::Key* TicketKeys::CurrentLocked(absl::Time now) {
  while (!keys_.empty() && now - keys_.back().made >= kEncryptFor + kDecryptFor) {
    OPENSSL_cleanse(&keys_.back(), sizeof(Key));
    keys_.pop_back();
  }
  if (keys_.empty() || now - keys_.front().made >= kEncryptFor) {
    Key k;
    if (RAND_bytes(k.name.data(), static_cast<int>(k.name.size())) != 1 ||
        RAND_priv_bytes(k.aes.data(), static_cast<int>(k.aes.size())) != 1 ||
        RAND_priv_bytes(k.hmac.data(), static_cast<int>(k.hmac.size())) != 1) {
      OPENSSL_cleanse(&k, sizeof(k));
      return keys_.empty() ? nullptr : &keys_.front();
    }
    k.made = now;
    keys_.push_front(k);
    OPENSSL_cleanse(&k, sizeof(k));
  }
  return &keys_.front();
}

int TicketKeys::Use(unsigned char name[kNameBytes], unsigned char iv[EVP_MAX_IV_LENGTH],
                    EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac, int enc) {
  std::lock_guard<std::mutex> lock(mu_);
  const Key* current = CurrentLocked(now_());
  if (current == nullptr) {
    return -1;
  }
  const Key* key = current;
  if (enc == 1) {
    std::memcpy(name, current->name.data(), kNameBytes);
    if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(EVP_aes_256_cbc())) != 1) {
      return -1;
    }
  } else {
    auto it = std::find_if(keys_.begin(), keys_.end(), [&](const Key& k) {
      return CRYPTO_memcmp(k.name.data(), name, kNameBytes) == 0;
    });
    if (it == keys_.end()) {
      return 0;  // Made with a key that is gone (or never ours): a full handshake.
    }
    key = &*it;
  }
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_octet_string(
          OSSL_MAC_PARAM_KEY, const_cast<unsigned char*>(key->hmac.data()), key->hmac.size()),
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, const_cast<char*>("SHA256"), 0),
      OSSL_PARAM_construct_end()};
  if (EVP_CipherInit_ex(cipher, EVP_aes_256_cbc(), nullptr, key->aes.data(), iv, enc) != 1 ||
      EVP_MAC_CTX_set_params(mac, params) != 1) {
    return -1;
  }
  return enc == 1 || key == current ? 1 : 2;
}

}  // namespace custody::proxy
