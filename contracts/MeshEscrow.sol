// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Clones} from "@openzeppelin/contracts/proxy/Clones.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @title EscrowVault: an address an entry node can name as its x402 `payTo`.
/// @notice An EIP-3009 `transferWithAuthorization` to a contract runs no code, so settled revenue simply
///         accumulates here. Only the escrow that deployed the implementation can pull it, and it always
///         credits the entry the clone was made for (the CREATE2 salt is the entry's address), so revenue
///         paid to a vault can only ever become that entry's escrow balance.
///         Clones share the implementation's code, and so its immutables.
contract EscrowVault {
    using SafeERC20 for IERC20;

    address public immutable escrow;
    IERC20 public immutable token;

    error OnlyEscrow(address caller);

    constructor(IERC20 token_) {
        escrow = msg.sender;
        token = token_;
    }

    function pull() external returns (uint256 amount) {
        if (msg.sender != escrow) revert OnlyEscrow(msg.sender);
        amount = token.balanceOf(address(this));
        if (amount > 0) token.safeTransfer(msg.sender, amount);
    }
}

/// @title MeshEscrow: per-entry escrow accounts and cumulative vouchers that pay workers without trusting the entry.
/// @notice Each entry node (an address) has a *free* balance it can deposit into and withdraw from at once, and,
///         per worker, a *channel* balance it has locked for that worker. The entry pays a worker by signing an
///         EIP-712 cumulative voucher "worker W may redeem up to T from entry E"; anyone may submit it and the
///         worker receives `T - redeemed` (one transaction pays for any number of requests). A channel balance
///         can only leave to its worker (a voucher), back to the entry after `unlockDelay` (a timed unlock the
///         worker sees coming), or back to the entry at once with the worker's own signed consent (a release).
///         So a voucher up to `coverage(E, W)` is always payable, and a worker that checks coverage before it
///         works and redeems within `unlockDelay` of an `UnlockRequested` can never be left unpaid.
contract MeshEscrow is EIP712 {
    using SafeERC20 for IERC20;
    using SafeCast for uint256;

    struct Channel {
        uint128 balance; // locked for the worker, not yet redeemed
        uint128 redeemed; // cumulative amount the worker has redeemed
        uint128 pendingUnlock; // amount the entry asked back; 0: none
        uint64 unlockAt; // when the pending unlock may complete
        uint64 releaseNonce; // next nonce of a worker-signed release
    }

    struct Voucher {
        address entry;
        address worker;
        uint256 cumulativeAmount;
        bytes signature;
    }

    bytes32 public constant VOUCHER_TYPEHASH =
        keccak256("Voucher(address entry,address worker,uint256 cumulativeAmount)");
    bytes32 public constant RELEASE_TYPEHASH =
        keccak256("Release(address entry,address worker,uint256 amount,uint256 nonce,uint256 deadline)");

    IERC20 public immutable token;
    uint64 public immutable unlockDelay;
    address public immutable vaultImplementation;

    mapping(address entry => uint256) private _free;
    mapping(address entry => mapping(address worker => Channel)) private _channels;

    event Deposited(address indexed entry, address indexed from, uint256 amount);
    event Withdrawn(address indexed entry, uint256 amount);
    event Locked(address indexed entry, address indexed worker, uint256 amount, uint256 balance);
    event UnlockRequested(address indexed entry, address indexed worker, uint256 amount, uint64 unlockAt);
    event UnlockCanceled(address indexed entry, address indexed worker);
    event Unlocked(address indexed entry, address indexed worker, uint256 amount);
    event Released(address indexed entry, address indexed worker, uint256 amount, uint256 nonce);
    event Redeemed(address indexed entry, address indexed worker, uint256 amount, uint256 cumulativeAmount);
    event VaultSwept(address indexed entry, address indexed vault, uint256 amount);

    error ZeroAmount();
    error ZeroWorker();
    error LengthMismatch();
    error InsufficientFree(address entry, uint256 available, uint256 wanted);
    error InsufficientEscrow(address entry, address worker, uint256 available, uint256 wanted);
    error AlreadyRedeemed(address entry, address worker, uint256 redeemed, uint256 cumulativeAmount);
    error InvalidSignature(address signer);
    error NoPendingUnlock(address entry, address worker);
    error UnlockNotReady(uint64 unlockAt);
    error ReleaseExpired(uint256 deadline);
    error ZeroDelay();

    constructor(IERC20 token_, uint64 unlockDelay_) EIP712("mesh402 Escrow", "1") {
        if (unlockDelay_ == 0) revert ZeroDelay();
        token = token_;
        unlockDelay = unlockDelay_;
        vaultImplementation = address(new EscrowVault(token_));
    }

    // ---- the entry's free balance -------------------------------------------------------------

    /// @notice Credit `entry`'s free balance with `amount` pulled from the caller (needs an allowance).
    function deposit(address entry, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        _free[entry] += amount;
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Deposited(entry, msg.sender, amount);
    }

    /// @notice Take back free (never locked) balance at once: no worker holds a voucher against it.
    function withdraw(uint256 amount) external {
        _takeFree(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
    }

    /// @notice The entry's vault: the `payTo` whose revenue only this escrow can collect, for this entry.
    function vaultOf(address entry) public view returns (address) {
        return Clones.predictDeterministicAddress(vaultImplementation, _vaultSalt(entry));
    }

    /// @notice Move what the entry's vault holds into its free balance (anyone may call; first call deploys it).
    function sweep(address entry) external returns (uint256 amount) {
        address vault = vaultOf(entry);
        if (vault.code.length == 0) Clones.cloneDeterministic(vaultImplementation, _vaultSalt(entry));
        amount = EscrowVault(vault).pull();
        _free[entry] += amount;
        emit VaultSwept(entry, vault, amount);
    }

    // ---- locking for workers ------------------------------------------------------------------

    /// @notice Lock free balance for workers: from now on only they (vouchers), a timed unlock or their
    ///         signed release can move it.
    function lock(address[] calldata workers, uint256[] calldata amounts) external {
        if (workers.length != amounts.length) revert LengthMismatch();
        uint256 total = 0;
        for (uint256 i = 0; i < workers.length; ++i) {
            if (workers[i] == address(0)) revert ZeroWorker();
            if (amounts[i] == 0) revert ZeroAmount();
            Channel storage c = _channels[msg.sender][workers[i]];
            c.balance = (uint256(c.balance) + amounts[i]).toUint128();
            total += amounts[i];
            emit Locked(msg.sender, workers[i], amounts[i], c.balance);
        }
        _takeFree(msg.sender, total);
    }

    /// @notice Ask for `amount` of a worker's channel back; completes after `unlockDelay`, giving the worker
    ///         that long to redeem what it holds. A new request replaces (and restarts) a pending one.
    function requestUnlock(address worker, uint256 amount) external {
        Channel storage c = _channels[msg.sender][worker];
        if (amount == 0) revert ZeroAmount();
        if (amount > c.balance) revert InsufficientEscrow(msg.sender, worker, c.balance, amount);
        c.pendingUnlock = amount.toUint128();
        c.unlockAt = uint64(block.timestamp) + unlockDelay;
        emit UnlockRequested(msg.sender, worker, amount, c.unlockAt);
    }

    function cancelUnlock(address worker) external {
        Channel storage c = _channels[msg.sender][worker];
        if (c.pendingUnlock == 0) revert NoPendingUnlock(msg.sender, worker);
        c.pendingUnlock = 0;
        c.unlockAt = 0;
        emit UnlockCanceled(msg.sender, worker);
    }

    /// @notice Complete a timed unlock; what the worker redeemed meanwhile is no longer there to take back.
    function finalizeUnlock(address worker) external returns (uint256 amount) {
        Channel storage c = _channels[msg.sender][worker];
        if (c.pendingUnlock == 0) revert NoPendingUnlock(msg.sender, worker);
        if (block.timestamp < c.unlockAt) revert UnlockNotReady(c.unlockAt);
        amount = c.pendingUnlock < c.balance ? c.pendingUnlock : c.balance;
        c.balance -= uint128(amount);
        c.pendingUnlock = 0;
        c.unlockAt = 0;
        _free[msg.sender] += amount;
        emit Unlocked(msg.sender, worker, amount);
    }

    /// @notice Take `amount` of a worker's channel back at once, with the worker's EIP-712 `Release` signature
    ///         (the worker signs only what exceeds every voucher it holds, and counts it as gone until `deadline`).
    ///         Each signature works once, and not after its deadline.
    function release(address worker, uint256 amount, uint256 deadline, bytes calldata workerSignature) external {
        Channel storage c = _channels[msg.sender][worker];
        uint256 nonce = c.releaseNonce;
        if (block.timestamp > deadline) revert ReleaseExpired(deadline);
        bytes32 digest = releaseDigest(msg.sender, worker, amount, nonce, deadline);
        if (!SignatureChecker.isValidSignatureNow(worker, digest, workerSignature)) revert InvalidSignature(worker);
        if (amount == 0) revert ZeroAmount();
        if (amount > c.balance) revert InsufficientEscrow(msg.sender, worker, c.balance, amount);
        c.balance -= uint128(amount);
        c.releaseNonce = uint64(nonce + 1);
        _free[msg.sender] += amount;
        emit Released(msg.sender, worker, amount, nonce);
    }

    // ---- redemption ---------------------------------------------------------------------------

    /// @notice Pay the worker `cumulativeAmount - redeemed` from the entry's channel for it; anyone may submit.
    function redeem(Voucher calldata v) external returns (uint256 amount) {
        amount = _redeem(v);
        token.safeTransfer(v.worker, amount);
    }

    /// @notice Redeem several vouchers in one transaction (all or nothing); consecutive vouchers to the same
    ///         worker are paid in one token transfer.
    function redeemBatch(Voucher[] calldata vouchers) external returns (uint256 total) {
        uint256 pending = 0;
        for (uint256 i = 0; i < vouchers.length; ++i) {
            uint256 amount = _redeem(vouchers[i]);
            total += amount;
            pending += amount;
            bool last = i + 1 == vouchers.length;
            if (last || vouchers[i + 1].worker != vouchers[i].worker) {
                token.safeTransfer(vouchers[i].worker, pending);
                pending = 0;
            }
        }
    }

    // ---- views --------------------------------------------------------------------------------

    function freeBalance(address entry) external view returns (uint256) {
        return _free[entry];
    }

    function channel(address entry, address worker)
        external
        view
        returns (uint256 balance, uint256 redeemed, uint256 pendingUnlock, uint64 unlockAt, uint64 releaseNonce)
    {
        Channel storage c = _channels[entry][worker];
        return (c.balance, c.redeemed, c.pendingUnlock, c.unlockAt, c.releaseNonce);
    }

    /// @notice The largest cumulative voucher the worker can be sure to redeem even if the pending unlock
    ///         completes: a worker should work only while its next voucher stays at or below this.
    function coverage(address entry, address worker) external view returns (uint256) {
        Channel storage c = _channels[entry][worker];
        uint256 pending = c.pendingUnlock < c.balance ? c.pendingUnlock : c.balance;
        return uint256(c.redeemed) + c.balance - pending;
    }

    function voucherDigest(address entry, address worker, uint256 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, entry, worker, cumulativeAmount)));
    }

    function releaseDigest(address entry, address worker, uint256 amount, uint256 nonce, uint256 deadline)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(RELEASE_TYPEHASH, entry, worker, amount, nonce, deadline)));
    }

    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ---- internals ----------------------------------------------------------------------------

    /// Checks and books one voucher; the caller transfers the tokens.
    function _redeem(Voucher calldata v) private returns (uint256 amount) {
        // The signature covers entry, worker and amount: a forged, inflated or re-addressed voucher recovers to
        // someone other than the entry and is refused here.
        if (!SignatureChecker.isValidSignatureNow(v.entry, voucherDigest(v.entry, v.worker, v.cumulativeAmount), v.signature)) {
            revert InvalidSignature(v.entry);
        }
        Channel storage c = _channels[v.entry][v.worker];
        if (v.cumulativeAmount <= c.redeemed) revert AlreadyRedeemed(v.entry, v.worker, c.redeemed, v.cumulativeAmount);
        amount = v.cumulativeAmount - c.redeemed;
        if (amount > c.balance) revert InsufficientEscrow(v.entry, v.worker, c.balance, amount);
        c.balance -= uint128(amount);
        c.redeemed = uint128(v.cumulativeAmount);
        emit Redeemed(v.entry, v.worker, amount, v.cumulativeAmount);
    }

    function _takeFree(address entry, uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        uint256 have = _free[entry];
        if (amount > have) revert InsufficientFree(entry, have, amount);
        _free[entry] = have - amount;
    }

    function _vaultSalt(address entry) private pure returns (bytes32) {
        return bytes32(uint256(uint160(entry)));
    }
}
