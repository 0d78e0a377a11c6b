# The seeds' UDP client (shared/seeds/002), in Python 3 form.
import os
import socket

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
for data in [b"Michael", b"Tracy", b"Sarah"]:
    s.sendto(data, ("127.0.0.1", int(os.environ.get("SEED_PORT", "9999"))))
    print(s.recv(1024).decode("utf-8"))
s.close()
